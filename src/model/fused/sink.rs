//! Parameter gradients added in place. candle's backward gives every gradient a fresh tensor and
//! adds it to a zero tensor of the parameter's size, and gradient accumulation then adds each
//! batch's gradients to the previous ones: three passes over every parameter per batch, and a
//! second gradient-sized allocation. While a [`SinkScope`] is open for a parameter, the training
//! ops here add its gradient straight into one buffer (the weight gradient's GEMM accumulates into
//! it) and hand candle none: one buffer per parameter for the whole accumulation group.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Result, Tensor, TensorId};

/// The open scopes' buffers by parameter. Tensor ids are unique in the process, so scopes of
/// different models (tests run in parallel) never meet.
static SINKS: Mutex<Option<HashMap<TensorId, Option<Vec<f32>>>>> = Mutex::new(None);

fn sinks() -> std::sync::MutexGuard<'static, Option<HashMap<TensorId, Option<Vec<f32>>>>> {
    // Buffers are only added to whole or taken whole: a panic cannot leave one torn.
    SINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds `param`'s gradient with `add(buffer, fresh)` when a scope is open for it (`fresh`: the
/// buffer is all zeros, so `add` may overwrite it); returns false, having done nothing, otherwise.
pub(crate) fn add_to(
    param: &Tensor,
    add: impl FnOnce(&mut [f32], bool) -> Result<()>,
) -> Result<bool> {
    if !param.is_variable() {
        return Ok(false);
    }
    let mut guard = sinks();
    let Some(slot) = guard.as_mut().and_then(|m| m.get_mut(&param.id())) else {
        return Ok(false);
    };
    let fresh = slot.is_none();
    // Zeroed by the allocator: pages a sparse gradient (an embedding's) never touches cost nothing.
    let buf = slot.get_or_insert_with(|| vec![0f32; param.elem_count()]);
    add(buf, fresh)?;
    Ok(true)
}

/// Routes the gradients of `params` to in-place buffers until [`SinkScope::take`] or drop.
pub struct SinkScope {
    ids: Vec<TensorId>,
}

impl SinkScope {
    pub fn open<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Self {
        let ids: Vec<TensorId> = params.into_iter().map(Tensor::id).collect();
        let mut guard = sinks();
        let map = guard.get_or_insert_with(HashMap::new);
        for &id in &ids {
            map.insert(id, None);
        }
        Self { ids }
    }

    /// The gradient the ops added for `param` (shaped like it), if any, leaving its buffer empty.
    pub fn take(&self, param: &Tensor) -> Result<Option<Tensor>> {
        let buf = sinks()
            .as_mut()
            .and_then(|m| m.get_mut(&param.id()))
            .and_then(Option::take);
        buf.map(|b| Tensor::from_vec(b, param.shape(), param.device()))
            .transpose()
    }
}

impl Drop for SinkScope {
    fn drop(&mut self) {
        if let Some(map) = sinks().as_mut() {
            for id in &self.ids {
                map.remove(id);
            }
        }
    }
}
