//! PyTorch Lightning checkpoints (`.ckpt`, a zip of pickles): their tensors and the plain data
//! in `hyper_parameters`.

use crate::model::error::{ModelError, Result};
use candle_core::pickle::{Object, PthTensors};
use serde_json::Value;
use std::path::Path;

/// The checkpoint's top-level pickle (tensors left as unresolved objects).
fn read_pickle(path: &Path) -> Result<Object> {
    let bad = |msg: String| ModelError::Checkpoint {
        path: path.to_owned(),
        msg,
    };
    let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("not a PyTorch zip checkpoint ({e})")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("no `data.pkl` in the archive".into()))?;
    let entry = zip.by_name(&name).map_err(|e| bad(e.to_string()))?;
    let mut reader = std::io::BufReader::new(entry);
    let mut stack = candle_core::pickle::Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| bad(format!("cannot unpickle {name}: {e}; {SLIM_HINT}")))?;
    stack
        .finalize()
        .map_err(|e| bad(format!("cannot unpickle {name}: {e}; {SLIM_HINT}")))
}

fn dict_get<'a>(obj: &'a Object, key: &str) -> Option<&'a Object> {
    match obj {
        Object::Dict(items) => items
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Plain pickled data (dicts, lists, strings, numbers) → JSON; anything else is an error naming `at`.
fn object_to_json(obj: &Object, at: &str) -> std::result::Result<Value, String> {
    Ok(match obj {
        Object::None => Value::Null,
        Object::Bool(b) => Value::Bool(*b),
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Object::Unicode(s) => Value::String(s.clone()),
        Object::List(v) | Object::Tuple(v) => Value::Array(
            v.iter()
                .enumerate()
                .map(|(i, o)| object_to_json(o, &format!("{at}[{i}]")))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Object::Dict(items) => {
            let mut map = serde_json::Map::new();
            for (k, v) in items {
                let key = match k {
                    Object::Unicode(s) => s.clone(),
                    Object::Int(i) => i.to_string(),
                    other => return Err(format!("`{at}` has a non-string key {other:?}")),
                };
                let value = object_to_json(v, &format!("{at}.{key}"))?;
                map.insert(key, value);
            }
            Value::Object(map)
        }
        other => {
            return Err(format!(
                "`{at}` holds a Python object JSON cannot represent: {other:?}"
            ))
        }
    })
}

/// `hyper_parameters.configs` of a Lightning checkpoint (the RoboVLMs config it was trained
/// with), if present.
pub fn hyper_parameters_configs(path: &Path) -> Result<Option<Value>> {
    let top = read_pickle(path)?;
    let Some(configs) = dict_get(&top, "hyper_parameters").and_then(|h| dict_get(h, "configs"))
    else {
        return Ok(None);
    };
    object_to_json(configs, "hyper_parameters.configs")
        .map(Some)
        .map_err(|msg| ModelError::Checkpoint {
            path: path.to_owned(),
            msg,
        })
}

/// What to do when candle's pickle reader meets Python objects it does not know (it reads the whole
/// checkpoint, optimiser and callback states included).
const SLIM_HINT: &str = "if the checkpoint holds Python objects beyond tensors and plain data, keep only what \
the import needs: python -c \"import torch; c = torch.load('in.ckpt', map_location='cpu', weights_only=False); \
torch.save({'state_dict': c['state_dict'], 'hyper_parameters': c.get('hyper_parameters', {})}, 'slim.ckpt')\"";

/// The checkpoint's tensors: under `state_dict` (Lightning) or at the top (`torch.save(state_dict)`).
pub fn open_tensors(path: &Path) -> Result<PthTensors> {
    let bad = |e: candle_core::Error| {
        let msg = e.to_string();
        let msg = if msg.contains("op-code") || msg.contains("expected a") {
            format!("{msg}; {SLIM_HINT}")
        } else {
            msg
        };
        ModelError::Checkpoint {
            path: path.to_owned(),
            msg,
        }
    };
    if !path.is_file() {
        return Err(ModelError::io(path, std::io::ErrorKind::NotFound.into()));
    }
    // Lightning nests the weights under `state_dict`; a bare `torch.save(state_dict)` has none.
    match PthTensors::new(path, Some("state_dict")) {
        Ok(t) => Ok(t),
        Err(e) if e.to_string().contains("key state_dict not found") => {
            PthTensors::new(path, None).map_err(bad)
        }
        Err(e) => Err(bad(e)),
    }
}
