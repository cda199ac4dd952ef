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
//! `b"KZT1" | u64 step | u32 count | count × (u32 ndim | ndim × u64 dim) | the data, in order`;
//! `b"KZH1"` is the same with IEEE fp16 data: residuals in half precision (`SessionOpen::residuals`),
//! half the bytes. A ControlNet computing in fp16 (GPU bundles: fp16 inside, f32 at the edges)
//! produces residuals that are fp16 values, so sending them so loses nothing.
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
    /// The precision the base asks the residuals in (absent from older bases: `auto`).
    #[serde(default)]
    pub residuals: Residuals,
    /// The W3C `traceparent` of the base's span (where traces are exported): the session's span
    /// joins the job's trace.
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// The precision of a session's residuals on the way back (Redis payload or CUDA IPC buffer).
/// The worker's answer says which it used, so either side may be older.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residuals {
    /// fp16 where that is exact (the ControlNet computes in fp16), else f32.
    #[default]
    Auto,
    /// Always f32.
    F32,
    /// Always fp16: half the transport; rounds the residuals of an f32 ControlNet.
    F16,
}

impl Residuals {
    /// Whether a ControlNet that computes in fp16 (`fp16_compute`) answers in fp16.
    pub fn half(self, fp16_compute: bool) -> bool {
        match self {
            Residuals::Auto => fp16_compute,
            Residuals::F32 => false,
            Residuals::F16 => true,
        }
    }
}

/// Not `auto`, `f32` or `f16`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: residual precision must be auto, f32 or f16")]
pub struct BadResiduals(pub String);

impl std::str::FromStr for Residuals {
    type Err = BadResiduals;
    fn from_str(s: &str) -> Result<Self, BadResiduals> {
        match s {
            "auto" => Ok(Residuals::Auto),
            "f32" => Ok(Residuals::F32),
            "f16" => Ok(Residuals::F16),
            _ => Err(BadResiduals(s.to_string())),
        }
    }
}

impl std::fmt::Display for Residuals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Residuals::Auto => "auto",
            Residuals::F32 => "f32",
            Residuals::F16 => "f16",
        })
    }
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
    /// The buffer holds IEEE fp16 values (absent from older workers: f32).
    #[serde(default)]
    pub f16: bool,
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
const MAGIC_F16: &[u8; 4] = b"KZH1";

/// Encodes `tensors` for step `step` (f32).
pub fn encode(step: u64, tensors: &[&Tensor]) -> Vec<u8> {
    encode_as(step, tensors, false)
}

/// Encodes `tensors` for step `step`, their values as IEEE fp16 when `half` (rounded to nearest).
pub fn encode_as(step: u64, tensors: &[&Tensor], half: bool) -> Vec<u8> {
    let width = if half { 2 } else { 4 };
    let data: usize = tensors.iter().map(|t| t.data.len() * width).sum();
    let mut out = Vec::with_capacity(16 + tensors.len() * 40 + data);
    out.extend_from_slice(if half { MAGIC_F16 } else { MAGIC });
    out.extend_from_slice(&step.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in &t.shape {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
    }
    for t in tensors {
        if half {
            for v in &t.data {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        } else {
            for v in &t.data {
                out.extend_from_slice(&v.to_le_bytes());
            }
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

/// Decodes what [`encode`] or [`encode_as`] wrote: the step and the tensors (as f32).
pub fn decode(bytes: &[u8]) -> Result<(u64, Vec<Tensor>), WireError> {
    let mut r = Reader { bytes, at: 0 };
    let half = match r.take(4)? {
        m if m == MAGIC => false,
        m if m == MAGIC_F16 => true,
        _ => return Err(WireError::Magic),
    };
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
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or(WireError::Overflow)?;
        let width = if half { 2 } else { 4 };
        let raw = r.take(n.checked_mul(width).ok_or(WireError::Overflow)?)?;
        let data = if half {
            raw.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        } else {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
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
            residuals: Residuals::Auto,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
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
        let without = SessionOpen {
            traceparent: None,
            ..open
        };
        assert_eq!(SessionOpen::decode(&old).unwrap(), without);
    }

    #[test]
    fn half_payloads_take_half_the_bytes_and_keep_fp16_values() {
        // values an fp16 ControlNet produces (fp16 numbers, cast to f32 at its outputs) come back exact
        let vals: Vec<f32> = [0.0f32, -1.5, 3.140625, 65504.0, 6.1035156e-5, -0.000_122_07]
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let a = Tensor::new(vec![2, 3], vals.clone());
        let full = encode(5, &[&a]);
        let halfp = encode_as(5, &[&a], true);
        assert_eq!(full.len() - halfp.len(), 6 * 2);
        assert_eq!(&halfp[..4], b"KZH1");
        let (step, back) = decode(&halfp).unwrap();
        assert_eq!((step, back[0].data.clone()), (5, vals));
        // other f32 values are rounded to the nearest fp16
        let b = Tensor::new(vec![1], vec![0.1]);
        let (_, back) = decode(&encode_as(0, &[&b], true)).unwrap();
        assert!((back[0].data[0] - 0.1).abs() < 1e-4 && back[0].data[0] != 0.1);
        assert!(decode(&halfp[..halfp.len() - 1]).is_err());
        // the precision a worker answers in
        assert!(Residuals::Auto.half(true) && !Residuals::Auto.half(false));
        assert!(Residuals::F16.half(false) && !Residuals::F32.half(true));
        assert_eq!("f16".parse::<Residuals>().unwrap(), Residuals::F16);
        assert!("bf16".parse::<Residuals>().is_err());
        // an IPC answer of an older worker (no f16 field) reads as f32
        #[derive(Serialize)]
        struct OldAnswer {
            step: u64,
            error: Option<String>,
            device: u32,
            buffer: String,
            event: String,
            shapes: Vec<Vec<u64>>,
        }
        let old = encode_ipc(&OldAnswer {
            step: 1,
            error: None,
            device: 0,
            buffer: String::new(),
            event: String::new(),
            shapes: vec![vec![1]],
        })
        .unwrap();
        assert!(!decode_ipc::<IpcResiduals>(&old).unwrap().unwrap().f16);
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
