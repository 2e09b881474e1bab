//! Every GGUF metadata key the project reads or writes (formats/gguf.md). Nothing else in the
//! crate spells a key; the Llama keys carry the `llama.` architecture prefix.

pub const GENERAL_ALIGNMENT: &str = "general.alignment";
pub const GENERAL_ARCHITECTURE: &str = "general.architecture";
pub const GENERAL_TYPE: &str = "general.type";
pub const GENERAL_NAME: &str = "general.name";
pub const GENERAL_SIZE_LABEL: &str = "general.size_label";
pub const GENERAL_FILE_TYPE: &str = "general.file_type";
pub const GENERAL_QUANTIZATION_VERSION: &str = "general.quantization_version";

pub const LLAMA_BLOCK_COUNT: &str = "llama.block_count";
pub const LLAMA_CONTEXT_LENGTH: &str = "llama.context_length";
pub const LLAMA_EMBEDDING_LENGTH: &str = "llama.embedding_length";
pub const LLAMA_FEED_FORWARD_LENGTH: &str = "llama.feed_forward_length";
pub const LLAMA_HEAD_COUNT: &str = "llama.attention.head_count";
pub const LLAMA_HEAD_COUNT_KV: &str = "llama.attention.head_count_kv";
pub const LLAMA_KEY_LENGTH: &str = "llama.attention.key_length";
pub const LLAMA_VALUE_LENGTH: &str = "llama.attention.value_length";
pub const LLAMA_RMS_EPS: &str = "llama.attention.layer_norm_rms_epsilon";
pub const LLAMA_ROPE_FREQ_BASE: &str = "llama.rope.freq_base";
pub const LLAMA_ROPE_DIMENSION_COUNT: &str = "llama.rope.dimension_count";
pub const LLAMA_VOCAB_SIZE: &str = "llama.vocab_size";

pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
pub const TOKENIZER_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub const TOKENIZER_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub const TOKENIZER_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
pub const TOKENIZER_SEP_ID: &str = "tokenizer.ggml.seperator_token_id";
pub const TOKENIZER_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
pub const TOKENIZER_CLS_ID: &str = "tokenizer.ggml.cls_token_id";
pub const TOKENIZER_MASK_ID: &str = "tokenizer.ggml.mask_token_id";
pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const TOKENIZER_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const TOKENIZER_IGNORE_MERGES: &str = "tokenizer.ggml.ignore_merges";
pub const TOKENIZER_CHAT_TEMPLATE: &str = "tokenizer.chat_template";

pub const QUANTIZE_IMATRIX_FILE: &str = "quantize.imatrix.file";
pub const QUANTIZE_IMATRIX_DATASET: &str = "quantize.imatrix.dataset";
pub const QUANTIZE_IMATRIX_ENTRIES: &str = "quantize.imatrix.entries_count";
pub const QUANTIZE_IMATRIX_CHUNKS: &str = "quantize.imatrix.chunks_count";

/// Keys of llama.cpp's GGUF importance-matrix files.
pub const IMATRIX_CHUNK_COUNT: &str = "imatrix.chunk_count";
pub const IMATRIX_CHUNK_SIZE: &str = "imatrix.chunk_size";
pub const IMATRIX_DATASETS: &str = "imatrix.datasets";
