//! Tensor roles of a Llama block and their Hugging Face names (formats/hf-llama.md#tensors).

use crate::model::config::LlamaConfig;

/// The linear layers of a block, in the order the forward pass meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearRole {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LinearRole {
    pub const ALL: [LinearRole; 7] = [
        LinearRole::Q,
        LinearRole::K,
        LinearRole::V,
        LinearRole::O,
        LinearRole::Gate,
        LinearRole::Up,
        LinearRole::Down,
    ];

    /// Suffix after `model.layers.N.` in Hugging Face checkpoints.
    pub fn hf_suffix(self) -> &'static str {
        match self {
            LinearRole::Q => "self_attn.q_proj",
            LinearRole::K => "self_attn.k_proj",
            LinearRole::V => "self_attn.v_proj",
            LinearRole::O => "self_attn.o_proj",
            LinearRole::Gate => "mlp.gate_proj",
            LinearRole::Up => "mlp.up_proj",
            LinearRole::Down => "mlp.down_proj",
        }
    }

    /// `[out_features, in_features]` for this role.
    pub fn shape(self, c: &LlamaConfig) -> [usize; 2] {
        match self {
            LinearRole::Q => [c.q_dim(), c.hidden_size],
            LinearRole::K | LinearRole::V => [c.kv_dim(), c.hidden_size],
            LinearRole::O => [c.hidden_size, c.q_dim()],
            LinearRole::Gate | LinearRole::Up => [c.intermediate_size, c.hidden_size],
            LinearRole::Down => [c.hidden_size, c.intermediate_size],
        }
    }
}

impl LinearRole {
    /// GGUF name stem (`blk.N.<stem>.weight`).
    pub fn gguf_stem(self) -> &'static str {
        match self {
            LinearRole::Q => "attn_q",
            LinearRole::K => "attn_k",
            LinearRole::V => "attn_v",
            LinearRole::O => "attn_output",
            LinearRole::Gate => "ffn_gate",
            LinearRole::Up => "ffn_up",
            LinearRole::Down => "ffn_down",
        }
    }

    /// The activation this layer reads.
    pub fn site(self) -> InputSite {
        match self {
            LinearRole::Q | LinearRole::K | LinearRole::V => InputSite::AttnIn,
            LinearRole::O => InputSite::AttnOut,
            LinearRole::Gate | LinearRole::Up => InputSite::MlpIn,
            LinearRole::Down => InputSite::MlpAct,
        }
    }
}

/// The four distinct linear-layer inputs of a block: q/k/v share the normed residual, gate/up
/// share the other normed residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputSite {
    /// input_layernorm output → q, k, v.
    AttnIn,
    /// attention output (heads concatenated) → o.
    AttnOut,
    /// post_attention_layernorm output → gate, up.
    MlpIn,
    /// silu(gate) · up → down.
    MlpAct,
}

impl InputSite {
    pub const ALL: [InputSite; 4] = [
        InputSite::AttnIn,
        InputSite::AttnOut,
        InputSite::MlpIn,
        InputSite::MlpAct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            InputSite::AttnIn => "attn_in",
            InputSite::AttnOut => "attn_out",
            InputSite::MlpIn => "mlp_in",
            InputSite::MlpAct => "mlp_act",
        }
    }

    pub fn roles(self) -> &'static [LinearRole] {
        match self {
            InputSite::AttnIn => &[LinearRole::Q, LinearRole::K, LinearRole::V],
            InputSite::AttnOut => &[LinearRole::O],
            InputSite::MlpIn => &[LinearRole::Gate, LinearRole::Up],
            InputSite::MlpAct => &[LinearRole::Down],
        }
    }

    /// Number of channels of this input.
    pub fn width(self, c: &LlamaConfig) -> usize {
        self.roles()[0].shape(c)[1]
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// GGUF names of the non-block tensors (llama.cpp's `LLM_TENSOR_NAMES` for the llama
/// architecture).
pub const GGUF_EMBED: &str = "token_embd.weight";
pub const GGUF_OUTPUT_NORM: &str = "output_norm.weight";
pub const GGUF_OUTPUT: &str = "output.weight";
pub const GGUF_ROPE_FREQS: &str = "rope_freqs.weight";

/// GGUF name of block `layer`'s attention RMSNorm weight.
pub fn gguf_attn_norm(layer: usize) -> String {
    format!("blk.{layer}.attn_norm.weight")
}

/// GGUF name of block `layer`'s MLP RMSNorm weight.
pub fn gguf_ffn_norm(layer: usize) -> String {
    format!("blk.{layer}.ffn_norm.weight")
}

/// The GGUF name of Hugging Face tensor `hf`, and the head count its rows are permuted for
/// (Q and K: llama.cpp keeps RoPE pairs adjacent); `None` for a tensor GGUF does not hold.
pub fn gguf_name(c: &LlamaConfig, hf: &str) -> Option<(String, Option<usize>)> {
    match hf {
        EMBED => return Some((GGUF_EMBED.into(), None)),
        FINAL_NORM => return Some((GGUF_OUTPUT_NORM.into(), None)),
        LM_HEAD => return Some((GGUF_OUTPUT.into(), None)),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (l, _) = rest.split_once('.')?;
    let l: usize = l.parse().ok().filter(|&l| l < c.num_hidden_layers)?;
    if hf == hf_input_norm(l) {
        return Some((gguf_attn_norm(l), None));
    }
    if hf == hf_post_norm(l) {
        return Some((gguf_ffn_norm(l), None));
    }
    let r = LinearRole::ALL
        .into_iter()
        .find(|&r| hf == hf_linear(l, r))?;
    let heads = match r {
        LinearRole::Q => Some(c.num_attention_heads),
        LinearRole::K => Some(c.num_key_value_heads),
        _ => None,
    };
    Some((gguf_linear(l, r), heads))
}

/// GGUF name of a block's linear weight.
pub fn gguf_linear(layer: usize, role: LinearRole) -> String {
    format!("blk.{layer}.{}.weight", role.gguf_stem())
}

/// Hugging Face name of a block's linear weight.
pub fn hf_linear(layer: usize, role: LinearRole) -> String {
    format!("model.layers.{layer}.{}.weight", role.hf_suffix())
}

/// Hugging Face names of the non-linear tensors.
pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

pub fn hf_input_norm(layer: usize) -> String {
    format!("model.layers.{layer}.input_layernorm.weight")
}

pub fn hf_post_norm(layer: usize) -> String {
    format!("model.layers.{layer}.post_attention_layernorm.weight")
}

/// One tensor the architecture expects.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: TensorRole,
    /// A tied `lm_head.weight` may be absent (or present as a copy).
    pub optional: bool,
}

/// What a tensor is in the architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    Embed,
    /// Block `l`'s attention RMSNorm weight.
    InputNorm(usize),
    /// Block `l`'s linear weight.
    Linear(usize, LinearRole),
    /// Block `l`'s MLP RMSNorm weight.
    PostNorm(usize),
    FinalNorm,
    LmHead,
}

impl TensorRole {
    /// The block and input site of a norm whose output feeds that site.
    pub fn norm_site(self) -> Option<(usize, InputSite)> {
        match self {
            TensorRole::InputNorm(l) => Some((l, InputSite::AttnIn)),
            TensorRole::PostNorm(l) => Some((l, InputSite::MlpIn)),
            _ => None,
        }
    }

    /// The block this tensor belongs to.
    pub fn layer(self) -> Option<usize> {
        match self {
            TensorRole::InputNorm(l) | TensorRole::Linear(l, _) | TensorRole::PostNorm(l) => {
                Some(l)
            }
            _ => None,
        }
    }
}

/// Every tensor of the architecture in Hugging Face order: embeddings, blocks, final norm, head.
pub fn expected_tensors(c: &LlamaConfig) -> Vec<TensorSpec> {
    let spec = |name: String, shape: Vec<usize>, role| TensorSpec {
        name,
        shape,
        role,
        optional: false,
    };
    let mut v = vec![spec(
        EMBED.into(),
        vec![c.vocab_size, c.hidden_size],
        TensorRole::Embed,
    )];
    for l in 0..c.num_hidden_layers {
        v.push(spec(
            hf_input_norm(l),
            vec![c.hidden_size],
            TensorRole::InputNorm(l),
        ));
        for role in LinearRole::ALL {
            v.push(spec(
                hf_linear(l, role),
                role.shape(c).to_vec(),
                TensorRole::Linear(l, role),
            ));
        }
        v.push(spec(
            hf_post_norm(l),
            vec![c.hidden_size],
            TensorRole::PostNorm(l),
        ));
    }
    v.push(spec(
        FINAL_NORM.into(),
        vec![c.hidden_size],
        TensorRole::FinalNorm,
    ));
    v.push(TensorSpec {
        name: LM_HEAD.into(),
        shape: vec![c.vocab_size, c.hidden_size],
        role: TensorRole::LmHead,
        optional: c.tie_word_embeddings,
    });
    v
}

impl LlamaConfig {
    /// Parameters of the architecture: embeddings, blocks, final norm and (untied) head.
    pub fn parameter_count(&self) -> u64 {
        expected_tensors(self)
            .iter()
            .filter(|s| !s.optional)
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum()
    }
}

/// The companion tensors of a quantized linear layer, by suffix after the layer's stem
/// (`model.layers.0.mlp.down_proj`): compressed-tensors' and ModelOpt's names
/// (formats/fp8.md, formats/int8.md, formats/nvfp4.md). Every reader and writer spells them
/// through these.
pub mod part {
    /// Codes packed into integers (`pack-quantized` INT4/INT8, NVFP4 nibbles).
    pub const WEIGHT_PACKED: &str = "weight_packed";
    /// Weight scales (per tensor, channel, group or block).
    pub const WEIGHT_SCALE: &str = "weight_scale";
    /// ModelOpt NVFP4's per-tensor second-level weight scale.
    pub const WEIGHT_SCALE_2: &str = "weight_scale_2";
    /// compressed-tensors NVFP4's per-tensor global weight scale.
    pub const WEIGHT_GLOBAL_SCALE: &str = "weight_global_scale";
    /// The unpacked `[out, in]` of a packed layer.
    pub const WEIGHT_SHAPE: &str = "weight_shape";
    /// Asymmetric zero points (read only to refuse them).
    pub const WEIGHT_ZERO_POINT: &str = "weight_zero_point";
    /// Static activation scale.
    pub const INPUT_SCALE: &str = "input_scale";
    /// compressed-tensors NVFP4's per-tensor global activation scale.
    pub const INPUT_GLOBAL_SCALE: &str = "input_global_scale";
    /// Static KV-cache scales (on the attention module).
    pub const K_SCALE: &str = "k_scale";
    pub const V_SCALE: &str = "v_scale";

    /// Every suffix above, longest first where one is a prefix of another.
    pub const ALL: [&str; 10] = [
        WEIGHT_GLOBAL_SCALE,
        INPUT_GLOBAL_SCALE,
        WEIGHT_SCALE_2,
        WEIGHT_SCALE,
        INPUT_SCALE,
        K_SCALE,
        V_SCALE,
        WEIGHT_PACKED,
        WEIGHT_SHAPE,
        WEIGHT_ZERO_POINT,
    ];

    /// The tensor `stem.suffix`.
    pub fn of(stem: &str, suffix: &str) -> String {
        format!("{stem}.{suffix}")
    }

    /// Block `layer`'s static KV-cache scales.
    pub fn kv_scales(layer: usize) -> [String; 2] {
        let attn = format!("model.layers.{layer}.self_attn");
        [of(&attn, K_SCALE), of(&attn, V_SCALE)]
    }
}
