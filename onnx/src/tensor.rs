//! A plain host tensor (row-major f32) and its passage to and from ONNX Runtime values.

use ort::session::SessionOutputs;
use ort::value::{Tensor as OrtTensor, TensorRef};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "tensor data does not fit shape {shape:?}"
        );
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// A borrowed ONNX Runtime view of this tensor (no copy).
    pub fn view(&self) -> Result<TensorRef<'_, f32>> {
        Ok(TensorRef::from_array_view((
            self.shape.as_slice(),
            self.data.as_slice(),
        ))?)
    }

    /// An owned ONNX Runtime value holding this tensor's buffer (no copy).
    pub fn into_value(self) -> Result<OrtTensor<f32>> {
        Ok(OrtTensor::from_array((self.shape, self.data))?)
    }

    /// Stacks tensors of one shape along a new leading axis merged into axis 0.
    pub fn concat0(parts: &[&Tensor]) -> Tensor {
        let first = parts[0];
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            assert_eq!(p.shape[1..], first.shape[1..], "concat0: shapes differ");
            data.extend_from_slice(&p.data);
        }
        Tensor { shape, data }
    }

    /// Copies output `name` of a run.
    pub fn from_output(outputs: &SessionOutputs<'_>, name: &str) -> Result<Tensor> {
        let value = outputs
            .get(name)
            .ok_or_else(|| Error::InvalidRequest(format!("graph produced no output `{name}`")))?;
        let (shape, data) = value.try_extract_tensor::<f32>()?;
        Ok(Tensor {
            shape: shape.iter().map(|&d| d as usize).collect(),
            data: data.to_vec(),
        })
    }
}
