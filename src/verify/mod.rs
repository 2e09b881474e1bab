//! Measuring a candidate model: perplexity (llama.cpp's protocol), KL-divergence and top-1
//! agreement against a reference, greedy-generation parity, and the report that holds them.
pub mod card;
pub mod gen;
pub mod overlap;
pub mod ppl;
pub mod report;
pub mod stats;
pub mod tasks;
