//! The Kosmos-2 tokenizer (`tokenizer.json`, XLM-R sentencepiece + `<grounding>` etc.) and the RoboVLMs
//! prompt.

use crate::model::error::{ModelError, Result};
use std::path::Path;

/// RoboVLMs' Kosmos prompt: `<grounding>` glued to the text, instruction stripped.
pub fn prompt(instruction: &str) -> String {
    format!("<grounding>An image of a robot {}", instruction.trim())
}

/// Tokenises prompts the way RoboVLMs does (`tokenizer(prompt)` with special tokens: `<s> … </s>`).
#[derive(Clone)]
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    path: std::path::PathBuf,
}

impl PromptTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    /// Token ids of the RoboVLMs prompt for `instruction`, including `<s>` and `</s>`.
    pub fn encode_instruction(&self, instruction: &str) -> Result<Vec<u32>> {
        let enc =
            self.inner
                .encode(prompt(instruction), true)
                .map_err(|e| ModelError::Tokenizer {
                    path: self.path.clone(),
                    msg: e.to_string(),
                })?;
        let ids = enc.get_ids().to_vec();
        // The embedding sequence splices the image after `<s>` and the action token before `</s>`,
        // so both must be there.
        if ids.len() < 2 {
            return Err(ModelError::Tokenizer {
                path: self.path.clone(),
                msg: format!(
                    "prompt encodes to {} tokens; expected `<s> … </s>` (is the post-processor missing?)",
                    ids.len()
                ),
            });
        }
        Ok(ids)
    }
}
