//! What travels between a base worker and a ControlNet worker.
//!
//! ```text
//! RabbitMQ katz.controlnet.<model>   SessionOpen (msgpack): v, session, model, job
//! Redis katz:cn:<session>:init       tensors: prompt_embeds, pooled, time_ids, image   (TTL)
//! Redis katz:cn:<session>:in         list of step inputs: step + tensors latent_in, timestep;
//!                                    an empty payload closes the session                (TTL)
//! Redis katz:cn:<session>:out        list of step outputs: step + residuals (down…, mid) (TTL)
//! ```
//!
//! Tensors are raw little-endian f32 with a shape header:
//! `b"KZT1" | u64 step | u32 count | count × (u32 ndim | ndim × u64 dim) | the data, in order`.
//!
//! With the CUDA IPC transport (`SessionOpen::ipc`) the `in` and `out` lists carry `b"KZI1"` +
//! msgpack [`IpcStep`] / [`IpcResiduals`] instead: IPC handles of device buffers and events, shapes,
//! the timestep — the tensors themselves stay in GPU memory (docs/controlnet.md).

use katz_onnx::tensor::Tensor;
use serde::{Deserialize, Serialize};

pub const SESSION_VERSION: u32 = 1;

/// A payload or message that cannot be read (or written): the other side speaks something else.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("encoding a CUDA IPC message: {0}")]
    EncodeIpc(#[source] rmp_serde::encode::Error),
    #[error("bad CUDA IPC message: {0}")]
    DecodeIpc(#[source] rmp_serde::decode::Error),
    #[error("the worker answered with tensors, not CUDA IPC handles")]
    NotIpc,
    #[error("not a session-open message: {0}")]
    NotSessionOpen(#[source] rmp_serde::decode::Error),
    #[error("session-open version {0} (this worker speaks {SESSION_VERSION})")]
    Version(u32),
    #[error("not a katz tensor payload (magic)")]
    Magic,
    #[error("tensor size overflows")]
    Overflow,
    #[error("tensor payload truncated at byte {at} (of {len})")]
    Truncated { at: usize, len: usize },
    #[error("{0} tensors in one payload")]
    TooManyTensors(usize),
    #[error("a tensor of {0} dimensions")]
    TooManyDims(usize),
    #[error("{0} trailing bytes after the tensors")]
    Trailing(usize),
    #[error("{what} holds {got} tensors, not {want}")]
    TensorCount {
        what: &'static str,
        got: usize,
        want: usize,
    },
}

/// Queue of ControlNet `model`'s session-open requests.
pub fn controlnet_queue(model: &str) -> String {
    format!("katz.controlnet.{model}")
}

pub fn init_key(session: &str) -> String {
    format!("katz:cn:{session}:init")
}

pub fn in_key(session: &str) -> String {
    format!("katz:cn:{session}:in")
}

pub fn out_key(session: &str) -> String {
    format!("katz:cn:{session}:out")
}

/// Asks a ControlNet worker to serve one job's steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOpen {
    pub v: u32,
    pub session: String,
    pub model: String,
    /// The job it serves (for logs).
    pub job: String,
    /// Steps travel by CUDA IPC (the base's host identity; a worker elsewhere refuses).
    #[serde(default)]
    pub ipc: Option<String>,
}

/// Prefix of the CUDA IPC transport's step messages.
pub const IPC_MAGIC: &[u8; 4] = b"KZI1";

/// A step's input by CUDA IPC: the base's latent buffer and the event recorded after writing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpcStep {
    pub step: u64,
    /// The base's host identity (hostname and boot id): IPC handles only open on that host.
    pub host: String,
    /// The GPU the latent lives on (the base's ordinal).
    pub device: u32,
    /// Hex IPC handles of the latent buffer and of its event.
    pub buffer: String,
    pub event: String,
    pub shape: Vec<u64>,
    pub timestep: Vec<f32>,
}

/// A step's residuals by CUDA IPC: the ControlNet worker's buffer (residuals back to back, down…
/// then mid) and the event recorded after writing it — or why IPC cannot be used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpcResiduals {
    pub step: u64,
    pub error: Option<String>,
    pub device: u32,
    pub buffer: String,
    pub event: String,
    pub shapes: Vec<Vec<u64>>,
}

/// `KZI1` + msgpack of `m`.
pub fn encode_ipc<T: Serialize>(m: &T) -> Result<Vec<u8>, WireError> {
    let mut out = IPC_MAGIC.to_vec();
    out.extend(rmp_serde::to_vec_named(m).map_err(WireError::EncodeIpc)?);
    Ok(out)
}

/// The message of an IPC payload; `None` when the payload is not one (`KZT1` tensors).
pub fn decode_ipc<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<Result<T, WireError>> {
    let body = bytes.strip_prefix(IPC_MAGIC.as_slice())?;
    Some(rmp_serde::from_slice(body).map_err(WireError::DecodeIpc))
}

/// This host's identity for CUDA IPC: hostname and boot id (a handle opens only on its host).
pub fn host_identity() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{}/{}",
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

impl SessionOpen {
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        rmp_serde::to_vec_named(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let m: SessionOpen = rmp_serde::from_slice(bytes).map_err(WireError::NotSessionOpen)?;
        if m.v != SESSION_VERSION {
            return Err(WireError::Version(m.v));
        }
        Ok(m)
    }
}

const MAGIC: &[u8; 4] = b"KZT1";

/// Encodes `tensors` for step `step`.
pub fn encode(step: u64, tensors: &[&Tensor]) -> Vec<u8> {
    let data: usize = tensors.iter().map(|t| t.data.len() * 4).sum();
    let mut out = Vec::with_capacity(16 + tensors.len() * 40 + data);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in &t.shape {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
    }
    for t in tensors {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Reads a payload front to back; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Overflow)?;
        let s = self.bytes.get(self.at..end).ok_or(WireError::Truncated {
            at: self.at,
            len: self.bytes.len(),
        })?;
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Decodes what [`encode`] wrote: the step and the tensors.
pub fn decode(bytes: &[u8]) -> Result<(u64, Vec<Tensor>), WireError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC {
        return Err(WireError::Magic);
    }
    let step = r.u64()?;
    let count = r.u32()? as usize;
    if count > 64 {
        return Err(WireError::TooManyTensors(count));
    }
    let mut shapes = Vec::with_capacity(count);
    for _ in 0..count {
        let nd = r.u32()? as usize;
        if nd > 8 {
            return Err(WireError::TooManyDims(nd));
        }
        let mut shape = Vec::with_capacity(nd);
        for _ in 0..nd {
            shape.push(r.u64()? as usize);
        }
        shapes.push(shape);
    }
    let mut tensors = Vec::with_capacity(count);
    for shape in shapes {
        let n: usize = shape.iter().product();
        let raw = r.take(n.checked_mul(4).ok_or(WireError::Overflow)?)?;
        let data = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        tensors.push(Tensor::new(shape, data));
    }
    if r.at != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - r.at));
    }
    Ok((step, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_bad_payloads_are_refused() {
        let a = Tensor::new(vec![2, 3], vec![1.0, -2.5, 3.0, 0.0, 1e-7, f32::MAX]);
        let b = Tensor::new(vec![1], vec![42.0]);
        let bytes = encode(17, &[&a, &b]);
        let (step, back) = decode(&bytes).unwrap();
        assert_eq!(step, 17);
        assert_eq!(
            (back[0].shape.clone(), back[0].data.clone()),
            (a.shape.clone(), a.data.clone())
        );
        assert_eq!(back[1].data, b.data);
        assert!(decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(decode(b"nope").unwrap_err().to_string().contains("magic"));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode(&extra).unwrap_err().to_string().contains("trailing"));
        let open = SessionOpen {
            v: SESSION_VERSION,
            session: "s".into(),
            model: "m".into(),
            job: "j".into(),
            ipc: None,
        };
        assert_eq!(SessionOpen::decode(&open.encode().unwrap()).unwrap(), open);
        assert!(SessionOpen::decode(b"\x01").is_err());
        // an open without the ipc field (an older base) still decodes
        #[derive(Serialize)]
        struct Old {
            v: u32,
            session: String,
            model: String,
            job: String,
        }
        let old = rmp_serde::to_vec_named(&Old {
            v: SESSION_VERSION,
            session: "s".into(),
            model: "m".into(),
            job: "j".into(),
        })
        .unwrap();
        assert_eq!(SessionOpen::decode(&old).unwrap(), open);
    }

    #[test]
    fn ipc_messages_round_trip_and_are_told_from_tensors() {
        let m = IpcStep {
            step: 3,
            host: host_identity(),
            device: 1,
            buffer: "ab".repeat(64),
            event: "cd".repeat(64),
            shape: vec![2, 4, 8, 8],
            timestep: vec![999.0, 999.0],
        };
        let bytes = encode_ipc(&m).unwrap();
        assert_eq!(decode_ipc::<IpcStep>(&bytes).unwrap().unwrap(), m);
        let t = Tensor::new(vec![1], vec![1.0]);
        assert!(decode_ipc::<IpcStep>(&encode(0, &[&t])).is_none());
        assert!(decode_ipc::<IpcResiduals>(b"KZI1\x01").unwrap().is_err());
        assert!(host_identity().contains('/'));
    }
}
