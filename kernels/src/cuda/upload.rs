//! Host → device copies of large buffers (a bundle's weights) through page-locked memory: two
//! pinned chunks take turns, one filling (a memcpy on the host) while the other's asynchronous
//! copy runs, so the host copy and the transfer overlap. The host copy bounds it: for many small
//! buffers it is no faster than the driver's own staging (docs/measurements.md, run N).
//!
//! ```text
//! host bytes ─copy─▶ pinned chunk [turn] ─async copy (stream)─▶ device
//!                    (waits for the event of that chunk's last copy first)
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};

use super::GpuError;

/// Bytes per pinned chunk unless a caller asks for fewer.
pub const PINNED_CHUNK: usize = 16 << 20;

/// Two pinned chunks and the stream their copies go on.
pub struct PinnedUpload {
    stream: Arc<CudaStream>,
    chunks: [PinnedHostSlice<u8>; 2],
    in_flight: [Option<CudaEvent>; 2],
    turn: usize,
}

impl PinnedUpload {
    /// Two chunks of `chunk` bytes (at least one) for copies on `stream`.
    pub fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, chunk: usize) -> Result<Self, GpuError> {
        let chunk = chunk.max(1);
        // SAFETY: a chunk's bytes are written before any copy reads them
        let chunks = unsafe { [ctx.alloc_pinned::<u8>(chunk)?, ctx.alloc_pinned::<u8>(chunk)?] };
        Ok(PinnedUpload {
            stream: stream.clone(),
            chunks,
            in_flight: [None, None],
            turn: 0,
        })
    }

    /// Queues the copy of `src` to the device address `dst`, chunk by chunk.
    ///
    /// # Safety
    /// `dst` must be valid for `src.len()` bytes on this upload's stream.
    pub unsafe fn copy_to(
        &mut self,
        src: &[u8],
        dst: cudarc::driver::sys::CUdeviceptr,
    ) -> Result<(), GpuError> {
        let chunk = self.chunks[0].len();
        for (i, piece) in src.chunks(chunk).enumerate() {
            // the chunk's previous copy must be done before it is written again
            if let Some(e) = self.in_flight[self.turn].take() {
                e.synchronize()?;
            }
            let p = &mut self.chunks[self.turn];
            let host = unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr()?, piece.len()) };
            host.copy_from_slice(piece);
            // SAFETY: the piece lies inside `dst` (the caller's promise); the pinned chunk is not
            // written again before the event below completes
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    dst + (i * chunk) as u64,
                    &*host,
                    self.stream.cu_stream(),
                )
            }?;
            self.in_flight[self.turn] = Some(self.stream.record_event(None)?);
            self.turn ^= 1;
        }
        Ok(())
    }

    /// Waits for every queued copy (the chunks may then be dropped).
    pub fn finish(self) -> Result<(), GpuError> {
        self.stream.synchronize()?;
        Ok(())
    }
}
