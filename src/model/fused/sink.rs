//! Parameter gradients added in place. candle's backward gives every gradient a fresh tensor and
//! adds it to a zero tensor of the parameter's size, and gradient accumulation then adds each
//! batch's gradients to the previous ones: three passes over every parameter per batch, and a
//! second gradient-sized allocation. While a [`SinkScope`] is open for a parameter, the training
//! ops here add its gradient straight into one buffer (the weight gradient's GEMM accumulates into
//! it) and hand candle none: one buffer per parameter for the whole accumulation group.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard};

use candle_core::{Device, Result, Tensor, TensorId};

type Buffers = HashMap<TensorId, Option<Vec<f32>>>;

/// The open scopes' buffers by parameter. Tensor ids are unique in the process, so scopes of
/// different models (tests run in parallel) never meet.
static SINKS: LazyLock<Mutex<Buffers>> = LazyLock::new(Mutex::default);

fn sinks() -> MutexGuard<'static, Buffers> {
    // Buffers are only added to whole or taken whole: a panic cannot leave one torn.
    SINKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `param`'s gradient by `add(buffer)`, which adds it into a buffer of `param`'s size: into its
/// sink when a scope is open for it, else into zeros handed to candle's backward as a fresh
/// tensor; none when `param` is not tracked.
pub(crate) fn gradient(
    param: &Tensor,
    add: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<Option<Tensor>> {
    if !param.track_op() {
        return Ok(None);
    }
    if param.is_variable() {
        if let Some(slot) = sinks().get_mut(&param.id()) {
            // Zeroed by the allocator: pages a sparse gradient (an embedding's) never touches
            // cost nothing.
            add(slot.get_or_insert_with(|| vec![0f32; param.elem_count()]))?;
            return Ok(None);
        }
    }
    let mut buf = vec![0f32; param.elem_count()];
    add(&mut buf)?;
    Tensor::from_vec(buf, param.shape(), &Device::Cpu).map(Some)
}

/// Routes the gradients of `params` to in-place buffers until [`SinkScope::take`] or drop.
pub struct SinkScope {
    ids: Vec<TensorId>,
}

impl SinkScope {
    pub fn open<'a>(params: impl IntoIterator<Item = &'a Tensor>) -> Self {
        let ids: Vec<TensorId> = params.into_iter().map(Tensor::id).collect();
        let mut map = sinks();
        for &id in &ids {
            map.insert(id, None);
        }
        Self { ids }
    }

    /// The gradient the ops added for `param` (shaped like it), if any, leaving its buffer empty.
    pub fn take(&self, param: &Tensor) -> Result<Option<Tensor>> {
        let buf = sinks().get_mut(&param.id()).and_then(Option::take);
        buf.map(|b| Tensor::from_vec(b, param.shape(), param.device()))
            .transpose()
    }
}

impl Drop for SinkScope {
    fn drop(&mut self) {
        let mut map = sinks();
        for id in &self.ids {
            map.remove(id);
        }
    }
}
