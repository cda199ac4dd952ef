//! The UNet pair bound to one job on one GPU with ONNX Runtime's IoBinding: weights bound in
//! place from device memory (pristine, or merged where a LoRA touched them), conditioning
//! copied up once, outputs left on the device for the residual adds and the decoder.

use ort::session::{IoBinding, Session};
use ort::value::DynValue;

use crate::shapes::skip_names;
use crate::text::Conditioning;
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

/// The UNet graphs of one job bound on a GPU.
pub(crate) struct BoundUnet {
    pub(crate) enc: IoBinding,
    pub(crate) dec: IoBinding,
    /// `emb`, `mid`, `skip_0` … in that order.
    pub(crate) enc_outputs: Vec<String>,
}

/// The UNet graphs of a job bound on GPU `device_id`: weights bound in place (pristine, or merged
/// where a LoRA touched them), conditioning copied up once, outputs left on the device.
pub(crate) fn bind_unet(
    enc_session: &Session,
    dec_session: &Session,
    weights: &Weights,
    skips: usize,
    cond: &Conditioning,
    merged: &MergedWeights,
    device_id: i32,
) -> Result<BoundUnet> {
    let dev = crate::device::cuda_memory(device_id)?;
    let mut enc = enc_session.create_binding()?;
    let mut dec = dec_session.create_binding()?;
    for b in [&mut enc, &mut dec] {
        b.bind_input("encoder_hidden_states", &*cond.prompt_embeds.view()?)?;
    }
    enc.bind_input("text_embeds", &*cond.pooled.view()?)?;
    enc.bind_input("time_ids", &*cond.time_ids.view()?)?;
    for (b, graph) in [(&mut enc, "unet_encoder"), (&mut dec, "unet_decoder")] {
        for name in weights.inputs_of(graph) {
            weights.bind_input(b, name, merged)?;
        }
    }
    let mut outs = vec!["emb".to_string(), "mid".to_string()];
    outs.extend(skip_names(skips));
    for o in &outs {
        enc.bind_output_to_device(o.as_str(), &dev)?;
    }
    dec.bind_output_to_device("noise_pred", &dev)?;
    Ok(BoundUnet {
        enc,
        dec,
        enc_outputs: outs,
    })
}

/// Binds the weights a LoRA merge touched in place of the pristine ones (at a step boundary).
pub(crate) fn rebind_weights(weights: &Weights, bu: &mut BoundUnet, merged: &MergedWeights) -> Result<()> {
    for name in merged.names().filter(|n| weights.is_unet(n)) {
        let b = match weights.map()[name].graph.as_str() {
            "unet_encoder" => &mut bu.enc,
            _ => &mut bu.dec,
        };
        weights.bind_input(b, name, merged)?;
    }
    Ok(())
}

/// Runs a bound UNet encoder; its outputs (`emb`, `mid`, skips), left on the device.
pub(crate) fn run_encoder_bound(session: &mut Session, bu: &BoundUnet) -> Result<Vec<DynValue>> {
    let mut out = session.run_binding(&bu.enc)?;
    bu.enc.synchronize_outputs()?;
    bu.enc_outputs
        .iter()
        .map(|name| {
            out.remove(name.as_str())
                .ok_or_else(|| Error::Gpu(format!("UNet encoder gave no {name}")))
        })
        .collect()
}

/// Runs a bound UNet decoder; its noise prediction, left on the device.
pub(crate) fn run_decoder_bound(session: &mut Session, bu: &BoundUnet) -> Result<DynValue> {
    let mut out = session.run_binding(&bu.dec)?;
    bu.dec.synchronize_outputs()?;
    out.remove("noise_pred")
        .ok_or_else(|| Error::Gpu("UNet decoder gave no noise_pred".into()))
}
