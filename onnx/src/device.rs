//! Tensors in GPU memory, and how they meet ONNX Runtime.
//!
//! ```text
//! DevTensor ── cudarc CudaSlice<f32> katz owns (latents, the scaled latent input, guided ε, staging)
//! DevRef    ── address + shape + GPU of a buffer someone else owns (ONNX Runtime's outputs: the
//!              UNet encoder's skips, a ControlNet's residuals), valid until its owner runs again
//!
//! DevTensor / DevRef ──bind_input (in place, no copy)──▶ IoBinding ──run──▶ outputs on the device
//!                                                                          └─▶ DevRef (no copy)
//! ```
//!
//! cudarc and ONNX Runtime's CUDA provider share each GPU's primary context, so an address from
//! one is valid for the other. They run on different streams: whoever writes a buffer synchronises
//! its stream before the other reads it (ONNX Runtime's runs return with their stream done).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use katz_kernels::cuda::GpuKernels;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::value::{DynTensorValueType, DynValue, TensorRefMut};

use crate::tensor::Tensor;
use crate::{Error, Result};

pub(crate) fn gpu_err(e: impl std::fmt::Display) -> Error {
    Error::Gpu(e.to_string())
}

/// The address, shape and GPU of an f32 device buffer owned elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevRef {
    pub ptr: u64,
    pub shape: Vec<usize>,
    pub device: usize,
}

impl DevRef {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The address as an ONNX Runtime tensor on its GPU, for binding in place (no copy).
    ///
    /// # Safety
    /// The buffer must hold `len()` f32 and outlive every run the tensor is bound to.
    pub unsafe fn ort(&self) -> Result<TensorRefMut<'static, f32>> {
        unsafe { ort_ref(self.ptr, &self.shape, self.device) }
    }

    /// A device tensor value's address (ONNX Runtime's output, on a GPU).
    pub fn of_value(v: &DynValue, device: usize) -> Result<DevRef> {
        let t = v.downcast_ref::<DynTensorValueType>()?;
        let mem = t.memory_info();
        if mem.allocation_device() != AllocationDevice::CUDA {
            return Err(Error::Gpu(format!(
                "expected a CUDA tensor, got one in {:?} memory",
                mem.allocation_device()
            )));
        }
        let shape = t.shape().iter().map(|&d| d as usize).collect();
        Ok(DevRef {
            ptr: t.data_ptr() as u64,
            shape,
            device,
        })
    }
}

/// ONNX Runtime's description of GPU `device`'s default memory (what CUDA tensors live in).
pub(crate) fn cuda_memory(device: i32) -> Result<MemoryInfo<'static>> {
    Ok(MemoryInfo::new(
        AllocationDevice::CUDA,
        device,
        AllocatorType::Device,
        MemoryType::Default,
    )?)
}

/// `ptr` on GPU `device` as an ONNX Runtime f32 tensor.
///
/// # Safety
/// See [`DevRef::ort`].
pub(crate) unsafe fn ort_ref(ptr: u64, shape: &[usize], device: usize) -> Result<TensorRefMut<'static, f32>> {
    let mem = cuda_memory(device as i32)?;
    let shape = ort::value::Shape::from(shape);
    Ok(unsafe { TensorRefMut::<f32>::from_raw(mem, ptr as usize as *mut std::ffi::c_void, shape)? })
}

/// An f32 tensor in device memory that katz owns.
pub struct DevTensor {
    pub buf: CudaSlice<f32>,
    pub shape: Vec<usize>,
    pub device: usize,
}

impl DevTensor {
    pub fn zeros(k: &GpuKernels, shape: Vec<usize>) -> Result<Self> {
        let n = shape.iter().product::<usize>().max(1);
        Ok(DevTensor {
            buf: k.stream.alloc_zeros::<f32>(n).map_err(gpu_err)?,
            shape,
            device: k.ordinal(),
        })
    }

    pub fn upload(k: &GpuKernels, t: &Tensor) -> Result<Self> {
        Ok(DevTensor {
            buf: k.stream.clone_htod(&t.data).map_err(gpu_err)?,
            shape: t.shape.clone(),
            device: k.ordinal(),
        })
    }

    /// Overwrites the contents from the host (same length).
    pub fn write(&mut self, k: &GpuKernels, data: &[f32]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::Gpu(format!(
                "write: {} values into {}",
                data.len(),
                self.len()
            )));
        }
        k.stream.memcpy_htod(data, &mut self.buf).map_err(gpu_err)
    }

    /// Copies to the host (waits for `k`'s stream).
    pub fn download(&self, k: &GpuKernels) -> Result<Tensor> {
        let data = k.stream.clone_dtoh(&self.buf).map_err(gpu_err)?;
        Ok(Tensor::new(self.shape.clone(), data[..self.len()].to_vec()))
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ptr(&self, k: &GpuKernels) -> u64 {
        self.buf.device_ptr(&k.stream).0
    }

    pub fn dev_ref(&self, k: &GpuKernels) -> DevRef {
        DevRef {
            ptr: self.ptr(k),
            shape: self.shape.clone(),
            device: self.device,
        }
    }
}

/// Copies an ONNX Runtime value (on any device) to the host.
pub fn value_to_host(v: &DynValue) -> Result<Tensor> {
    let t = v.downcast_ref::<DynTensorValueType>()?;
    let host = t.to(AllocationDevice::CPU, 0)?;
    let (shape, data) = host.try_extract_tensor::<f32>()?;
    Ok(Tensor::new(
        shape.iter().map(|&d| d as usize).collect(),
        data.to_vec(),
    ))
}

/// Step kernels for GPU `ordinal` on a stream of their own (NVRTC compile, once per call).
pub fn kernels_for(ordinal: usize) -> Result<Arc<GpuKernels>> {
    GpuKernels::new(ordinal)
        .map(Arc::new)
        .map_err(|e| Error::DeviceUnavailable {
            device: format!("cuda:{ordinal}"),
            message: format!("the step kernels cannot start: {e}"),
        })
}

/// Makes GPU `k`'s primary context current on this thread before ONNX Runtime touches a session
/// of that GPU (its host-to-device copies at bind time use the current device; ONNX Runtime sets
/// the device only when a thread first runs a session).
pub(crate) fn current(k: &GpuKernels) -> Result<()> {
    k.ctx.bind_to_thread().map_err(gpu_err)
}

/// Names the stage an error of a GPU loop came from.
pub(crate) fn at(what: &str, e: Error) -> Error {
    match e {
        Error::Ort(e) => Error::Gpu(format!("{what}: {e}")),
        Error::Gpu(m) => Error::Gpu(format!("{what}: {m}")),
        other => other,
    }
}

/// GPUs `a` and `b` read each other's memory (peer copies of latents, residuals, weights).
pub(crate) fn peer(a: i32, b: i32) -> Result<()> {
    katz_kernels::cuda::enable_peer_access(a as usize, b as usize).map_err(|e| Error::DeviceUnavailable {
        device: format!("cuda:{a} + cuda:{b}"),
        message: format!("peer access between the GPUs cannot be enabled: {e}"),
    })
}

/// Free memory of `k`'s GPU in bytes (its context made current), or None if CUDA cannot say.
pub(crate) fn free_memory(k: &GpuKernels) -> Option<u64> {
    current(k).ok()?;
    cudarc::driver::result::mem_get_info()
        .ok()
        .map(|(free, _)| free as u64)
}

/// Who may use a GPU while a CUDA graph is captured after load ([`crate::runtime::BucketLoad::FirstUse`]).
/// ONNX Runtime captures in CUDA's global mode: while it captures, no other thread of the
/// process may allocate or synchronise. Threads other than the model thread that touch a GPU
/// beside the jobs (the bucket opener, LoRA merges on the device) hold [`beside_capture`] while
/// they do; a capture holds [`capturing`], so it starts once they are done and they wait for it.
/// Neither side waits for anything else while it holds its guard.
static CAPTURE_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Shared: GPU work on a thread that is not a model thread (see [`CAPTURE_GATE`]).
pub(crate) fn beside_capture() -> std::sync::RwLockReadGuard<'static, ()> {
    CAPTURE_GATE.read().unwrap_or_else(|p| p.into_inner())
}

/// Exclusive: a CUDA-graph capture on a model thread after load (see [`CAPTURE_GATE`]).
pub(crate) fn capturing() -> std::sync::RwLockWriteGuard<'static, ()> {
    CAPTURE_GATE.write().unwrap_or_else(|p| p.into_inner())
}
