//! A LoRA adapter: its layers by bundle weight name, read from a safetensors file.
//!
//! ```text
//! bytes ─ read ─▶ tensors (sorted by key) + the metadata's alpha
//!       ─ LoraLayout::detect ─▶ Peft | Kohya                     (layout.rs)
//!       ─ sort_keys (KeyMap::place) ─▶ factors to convert | refused keys   (peft: layout.rs, kohya.rs)
//!       ─ convert (f32, in parallel) ─▶ Collected: A, B, alpha by weight
//!       ─ Refused::check ─▶ one error naming every key that cannot be used, or the parts
//!                            the bundle cannot take (`Untaken`: text encoders, convolutions)
//!       ─ pair_factors (B·A must make the weight's shape; convolutions: down [r, in, kh, kw],
//!                       up [out, r, 1, 1] as [r, in·kh·kw] and [out, r]) ─▶ LoraAdapter
//!       ─ LoraAdapter::check(LoraParts) ─▶ untaken parts: an error naming them (All), or
//!                                           skipped and recorded (Takeable: a job's `unet_only`)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

use super::err;
use super::kohya::KohyaMap;
use super::layout::{peft_place, LoraLayout, LySlot, Place, Slot};
use super::lycoris::Factor;
use super::parts::{other_kind, Refused};
pub use super::parts::{LoraParts, Untaken};
use crate::bundle::WeightEntry;
use crate::dtype::to_f32;
use crate::{Error, Result};

/// One adapted weight: `ΔW = (alpha / rank) · B · A`. For a convolution weight `[out, in, kh, kw]`
/// `a` holds the down factor `[r, in, kh, kw]` as `[r, in·kh·kw]` and `b` the up factor
/// `[out, r, 1, 1]` as `[out, r]` (the same memory): `B·A` is `ΔW` as `[out, in·kh·kw]`.
///
/// A DoRA layer (peft `use_dora`) has a `magnitude` m, one value per output row: at LoRA scale
/// s it makes `W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖` (row norms of the pristine `W`; peft's
/// "column-wise" norm of `Wᵀ`), applied, as peft does, to what the job's adapters before it
/// made (`merge.rs`). Not low-rank: it needs the pristine weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayer {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub alpha: f32,
    /// DoRA's magnitude vector (`[out]`), or `None` for a LoRA layer.
    pub magnitude: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub name: String,
    pub layout: LoraLayout,
    /// By weight name of the bundle (`…to_q.weight`).
    pub layers: BTreeMap<String, LoraLayer>,
    /// The file's parts this bundle cannot take (not in `layers`); see [`LoraAdapter::check`].
    pub untaken: Untaken,
}

impl LoraAdapter {
    /// Reads a LoRA file and maps it onto `weights` (a bundle's weight map); a part the bundle
    /// cannot take is an error naming it.
    pub fn load(path: &Path, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        Self::load_with(path, weights, LoraParts::All)
    }

    /// [`LoraAdapter::load`] using `parts`: with [`LoraParts::Takeable`] the parts the bundle
    /// cannot take are skipped (in `untaken`).
    pub fn load_with(path: &Path, weights: &BTreeMap<String, WeightEntry>, parts: LoraParts) -> Result<Self> {
        if !path.is_file() {
            return Err(err(path, "no such file"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let a = Self::parse(&bytes, path, weights)?;
        a.check(parts)?;
        Ok(a)
    }

    /// Maps the safetensors file in `bytes` onto `weights` (a bundle's weight map); `origin` (a
    /// name or path) is the adapter's `path`, names it in errors and gives its `name` (the stem).
    /// A part the bundle cannot take is an error naming it.
    pub fn from_bytes(bytes: &[u8], origin: &str, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        Self::from_bytes_with(bytes, origin, weights, LoraParts::All)
    }

    /// [`LoraAdapter::from_bytes`] using `parts`. A cache that serves jobs of either kind reads
    /// with [`LoraParts::Takeable`] and checks each job's parts with [`LoraAdapter::check`].
    pub fn from_bytes_with(
        bytes: &[u8],
        origin: &str,
        weights: &BTreeMap<String, WeightEntry>,
        parts: LoraParts,
    ) -> Result<Self> {
        let a = Self::parse(bytes, Path::new(origin), weights)?;
        a.check(parts)?;
        Ok(a)
    }

    /// Whether a job using `parts` can use this adapter: with [`LoraParts::All`], parts the
    /// bundle cannot take are an error naming their keys; otherwise they are skipped (the
    /// adapter's `untaken` says which).
    pub fn check(&self, parts: LoraParts) -> Result<()> {
        if parts == LoraParts::All && !self.untaken.is_empty() {
            let mut problems = self.untaken.problems();
            problems.push(
                "a job with `unet_only` skips the parts the bundle cannot take (katz generate/submit --unet-only)"
                    .into(),
            );
            return Err(err(&self.path, problems.join("; ")));
        }
        Ok(())
    }

    /// Bytes of the f32 factors held.
    pub fn nbytes(&self) -> usize {
        let magnitudes = |l: &LoraLayer| l.magnitude.as_ref().map_or(0, Vec::len);
        4 * self
            .layers
            .values()
            .map(|l| l.a.len() + l.b.len() + magnitudes(l))
            .sum::<usize>()
    }

    /// Whether it has DoRA layers (merged on the host only).
    pub fn has_dora_layers(&self) -> bool {
        self.layers.values().any(|l| l.magnitude.is_some())
    }

    /// Whether it adapts a text encoder's weights.
    pub fn has_text_encoder_layers(&self) -> bool {
        self.layers.keys().any(|w| super::is_text_weight(w))
    }

    /// The key layout of the file it was read from.
    pub fn layout(&self) -> LoraLayout {
        self.layout
    }

    fn parse(bytes: &[u8], path: &Path, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        let (st, file_alpha) = read(bytes, path)?;
        let mut tensors = st.tensors();
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
        let layout = LoraLayout::detect(path, &keys)?;
        let map = KeyMap::new(layout, weights);
        let (todo, refused) = sort_keys(path, &map, &tensors)?;
        let got = convert(path, todo)?;
        let untaken = refused.check(path, &map, got.is_empty())?;
        let layers = pair_factors(path, layout, got, weights, file_alpha, !untaken.is_empty())?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LoraAdapter {
            path: path.to_path_buf(),
            name,
            layout,
            layers,
            untaken,
        })
    }
}

/// The safetensors file in `bytes`, and the alphas its metadata gives (if any).
fn read<'b>(bytes: &'b [u8], path: &Path) -> Result<(SafeTensors<'b>, FileAlpha)> {
    let (_, meta) =
        SafeTensors::read_metadata(bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    Ok((st, metadata_alpha(meta.metadata().as_ref())))
}

/// The alphas in the `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes into
/// a file's metadata, per part: `unet.lora_alpha`, `text_encoder.lora_alpha`,
/// `text_encoder_2.lora_alpha` (each part's peft `LoraConfig`), or a plain `lora_alpha` for all.
#[derive(Debug, Default, Clone, PartialEq)]
struct FileAlpha {
    unet: Option<f32>,
    text: [Option<f32>; 2],
}

impl FileAlpha {
    /// The alpha the metadata gives the part that bundle weight `weight` belongs to.
    fn of(&self, weight: &str) -> Option<f32> {
        match super::layout::text_part(weight) {
            Some(("text_encoder_2", _)) => self.text[1],
            Some(_) => self.text[0],
            None => self.unet,
        }
    }
}

fn metadata_alpha(st_meta: Option<&HashMap<String, String>>) -> FileAlpha {
    let Some(v) = st_meta
        .and_then(|m| m.get("lora_adapter_metadata"))
        .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw).ok())
    else {
        return FileAlpha::default();
    };
    let get = |key: &str| v.get(key).and_then(|a| a.as_f64()).map(|a| a as f32);
    let plain = get("lora_alpha");
    FileAlpha {
        unet: get("unet.lora_alpha").or(plain),
        text: [
            get("text_encoder.lora_alpha").or(plain),
            get("text_encoder_2.lora_alpha").or(plain),
        ],
    }
}

/// The mapping of a layout's keys onto a bundle's weight names.
pub(super) enum KeyMap<'w> {
    Peft(&'w BTreeMap<String, WeightEntry>),
    Kohya(KohyaMap<'w>),
}

impl<'w> KeyMap<'w> {
    fn new(layout: LoraLayout, weights: &'w BTreeMap<String, WeightEntry>) -> Self {
        match layout {
            LoraLayout::Peft => KeyMap::Peft(weights),
            LoraLayout::Kohya => KeyMap::Kohya(KohyaMap::new(weights)),
        }
    }

    /// Where `key` (a tensor of shape `shape`) goes.
    fn place(&self, path: &Path, key: &str, shape: &[usize]) -> Result<Place> {
        match self {
            KeyMap::Peft(weights) => Ok(peft_place(weights, key, shape)),
            KeyMap::Kohya(k) => k.place(path, key, shape),
        }
    }

    /// What to add to the error that names unmatched keys, where the layout knows why they match
    /// nothing.
    pub(super) fn unmatched_hint(&self, unmatched: &[String]) -> Option<String> {
        match self {
            KeyMap::Peft(_) => None,
            KeyMap::Kohya(k) => k.unmatched_hint(unmatched),
        }
    }
}

/// A key onto a bundle weight, still to convert: key, weight, slot, tensor.
type Todo<'t, 'd> = (&'t str, String, Slot, &'t TensorView<'d>);

/// Sorts the keys of a file by where they go: the factors to convert, in key order, and the keys
/// that cannot be used. A kohya module name that fits two weights fails here, before any
/// conversion.
fn sort_keys<'t, 'd>(
    path: &Path,
    map: &KeyMap<'_>,
    tensors: &'t [(String, TensorView<'d>)],
) -> Result<(Vec<Todo<'t, 'd>>, Refused)> {
    let mut todo = Vec::new();
    let mut refused = Refused::default();
    for (key, t) in tensors {
        // LoHa and LoKr are read in the kohya (LyCORIS) naming, whose files carry each module's
        // alpha; in the peft layout their alphas live in the peft config, which is not read
        let peft = matches!(map, KeyMap::Peft(_));
        if let Some((kind, module)) = other_kind(key).filter(|(k, _)| peft || *k == "DoRA") {
            refused.other.entry(kind).or_default().push(key.clone());
            refused.other_modules.insert(module.to_string());
            continue;
        }
        match map.place(path, key, t.shape())? {
            Place::Weight(weight, slot) => todo.push((key.as_str(), weight, slot, t)),
            Place::TextEncoder => refused.untaken.text_encoder.push(key.clone()),
            Place::Conv(module) => {
                refused.untaken.conv.push(format!("{key} {:?}", t.shape()));
                refused.untaken_modules.insert(module);
            }
            Place::TimeEmb(module) => {
                refused.untaken.time_emb.push(key.clone());
                refused.untaken_modules.insert(module);
            }
            Place::Unmatched => refused.unmatched.push(key.clone()),
        }
    }
    Ok((todo, refused))
}

/// Converts the factors to f32 and collects them by weight. The conversions run in parallel (a
/// rank-64 SDXL LoRA holds 167 M values); errors are taken in key order, the first one wins.
fn convert(path: &Path, todo: Vec<Todo<'_, '_>>) -> Result<Collected> {
    let converted: Vec<_> = todo
        .into_par_iter()
        .map(|(key, weight, slot, t)| {
            let data = to_f32(t.dtype(), t.data())
                .ok_or_else(|| err(path, format!("`{key}` has unsupported dtype {:?}", t.dtype())))
                .and_then(|d| {
                    // a factor with NaN or ±inf would poison every merged weight it touches
                    let bad = d.iter().filter(|v| !v.is_finite()).count();
                    if bad > 0 {
                        Err(err(
                            path,
                            format!("`{key}` holds {bad} non-finite values (NaN or ±inf)"),
                        ))
                    } else {
                        Ok(d)
                    }
                });
            (key, weight, slot, t.shape().to_vec(), data)
        })
        .collect();
    let mut got = Collected::default();
    for (key, weight, slot, shape, data) in converted {
        got.put(path, key, weight, slot, shape, data?)?;
    }
    Ok(got)
}

/// What the keys of a file say, by bundle weight name.
#[derive(Default)]
struct Collected {
    a: BTreeMap<String, Factor>,
    b: BTreeMap<String, Factor>,
    alpha: BTreeMap<String, f32>,
    /// LyCORIS (LoHa, LoKr) factors.
    ly: BTreeMap<String, BTreeMap<LySlot, Factor>>,
    /// DoRA magnitude vectors.
    magnitude: BTreeMap<String, Factor>,
}

impl Collected {
    fn put(
        &mut self,
        path: &Path,
        key: &str,
        weight: String,
        slot: Slot,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<()> {
        let dup = match slot {
            Slot::A => self.a.insert(weight.clone(), (shape, data)).is_some(),
            Slot::B => self.b.insert(weight.clone(), (shape, data)).is_some(),
            Slot::Magnitude => self.magnitude.insert(weight.clone(), (shape, data)).is_some(),
            Slot::Ly(s) => self
                .ly
                .entry(weight.clone())
                .or_default()
                .insert(s, (shape, data))
                .is_some(),
            Slot::Alpha => {
                let v = *data
                    .first()
                    .ok_or_else(|| err(path, format!("`{key}` is empty")))?;
                self.alpha.insert(weight.clone(), v).is_some()
            }
        };
        if dup {
            return Err(err(
                path,
                format!("`{key}`: a second key for the same factor of `{weight}`"),
            ));
        }
        Ok(())
    }

    /// Whether no key gave a factor (alphas aside).
    fn is_empty(&self) -> bool {
        self.a.is_empty() && self.b.is_empty() && self.ly.is_empty()
    }
}

/// Whether `B·A` makes a weight of shape `target`: linear `[r, in]`, `[out, r]` onto
/// `[out, in]`; convolution `[r, in, kh, kw]`, `[out, r, 1, 1]` onto `[out, in, kh, kw]` (kohya
/// LoCon, peft's LoRA on `Conv2d`: the up factor is a 1×1 convolution).
fn factors_fit(a: &[usize], b: &[usize], target: &[usize]) -> bool {
    match (a, b, target) {
        ([r, i], [o, r2], [to, ti]) => r == r2 && o == to && i == ti,
        ([r, i, kh, kw], [o, r2, 1, 1], [to, ti, th, tw]) => {
            r == r2 && o == to && i == ti && kh == th && kw == tw
        }
        _ => false,
    }
}

/// Pairs each weight's A with its B into layers, checking that `B·A` makes the weight's shape.
/// Alpha: the module's `.alpha` key, else the file's metadata, else the rank (scale 1).
/// `some_untaken`: the file has parts the bundle cannot take (so no layer at all is no error).
fn pair_factors(
    path: &Path,
    layout: LoraLayout,
    mut got: Collected,
    weights: &BTreeMap<String, WeightEntry>,
    file_alpha: FileAlpha,
    some_untaken: bool,
) -> Result<BTreeMap<String, LoraLayer>> {
    if got.a.is_empty() && got.ly.is_empty() && got.b.is_empty() && some_untaken {
        return Ok(BTreeMap::new());
    }
    if got.a.is_empty() && got.ly.is_empty() {
        return Err(err(
            path,
            "holds no LoRA layers (no `lora_A`/`lora_B`, `lora_down`/`lora_up`, `hada_*` or `lokr_*` keys)",
        ));
    }
    let (a_name, b_name) = layout.factor_names();
    let mut layers = BTreeMap::new();
    for (weight, (ashape, a)) in std::mem::take(&mut got.a) {
        let (bshape, b) = got
            .b
            .remove(&weight)
            .ok_or_else(|| err(path, format!("`{weight}` has {a_name} but no {b_name}")))?;
        let target = &weights[&weight].shape;
        if !factors_fit(&ashape, &bshape, target) {
            return Err(err(
                path,
                format!(
                    "`{weight}`: {b_name} {bshape:?} · {a_name} {ashape:?} does not make the weight's {target:?} \
                     (a LoRA for another architecture?)"
                ),
            ));
        }
        let rank = ashape[0];
        let alpha = got
            .alpha
            .get(&weight)
            .copied()
            .or(file_alpha.of(&weight))
            .unwrap_or(rank as f32);
        let magnitude = match got.magnitude.remove(&weight) {
            // [out] (linear) or [1, out, 1, 1] (convolution), as peft stores it
            Some((mshape, m)) if m.len() == target[0] && mshape.iter().filter(|&&d| d != 1).count() <= 1 => {
                Some(m)
            }
            Some((mshape, _)) => {
                return Err(err(
                    path,
                    format!(
                        "`{weight}`: its DoRA magnitude {mshape:?} does not have the weight's {} rows \
                         (a LoRA for another architecture?)",
                        target[0]
                    ),
                ))
            }
            None => None,
        };
        layers.insert(
            weight,
            LoraLayer {
                a,
                b,
                rank,
                alpha,
                magnitude,
            },
        );
    }
    if let Some(w) = got.b.keys().next() {
        return Err(err(path, format!("`{w}` has {b_name} but no {a_name}")));
    }
    if let Some(w) = got.magnitude.keys().next() {
        return Err(err(
            path,
            format!("`{w}` has a DoRA magnitude (lora_magnitude_vector) but no {a_name}/{b_name}"),
        ));
    }
    for (weight, factors) in std::mem::take(&mut got.ly) {
        if layers.contains_key(&weight) {
            return Err(err(path, format!("`{weight}` has both LoRA and LyCORIS factors")));
        }
        let target = &weights[&weight].shape;
        let layer = super::lycoris::low_rank(&factors, target, got.alpha.get(&weight).copied())
            .map_err(|m| err(path, format!("`{weight}`: {m}")))?;
        layers.insert(weight, layer);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::fixtures::values;
    use crate::lora::fixtures::{kohya_name, serialize, Entry};

    const Q: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    const FF: &str = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj";
    const OUT: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0";
    const PROJ_IN: &str = "down_blocks.1.attentions.0.proj_in";

    /// module → (out, in)
    const MODULES: [(&str, usize, usize); 4] = [(Q, 8, 6), (FF, 12, 6), (OUT, 6, 8), (PROJ_IN, 6, 6)];

    fn weight_map() -> BTreeMap<String, WeightEntry> {
        MODULES
            .iter()
            .map(|&(m, o, i)| {
                (
                    format!("{m}.weight"),
                    WeightEntry {
                        graph: "unet_encoder".into(),
                        shape: vec![o, i],
                    },
                )
            })
            .collect()
    }

    /// Rank-`r` factors for every module: (module, A [r,in], B [out,r], alpha).
    fn factors(r: usize) -> Vec<(&'static str, Vec<f32>, Vec<f32>, f32)> {
        MODULES
            .iter()
            .enumerate()
            .map(|(i, &(m, o, inp))| {
                (
                    m,
                    values(r * inp, 2 * i as u64),
                    values(o * r, 2 * i as u64 + 1),
                    1.5 + i as f32,
                )
            })
            .collect()
    }

    fn peft_entries(r: usize) -> Vec<Entry> {
        let mut e = Vec::new();
        for (i, (m, a, b, alpha)) in factors(r).into_iter().enumerate() {
            let inp = a.len() / r;
            let out = b.len() / r;
            // Half of the keys carry the `unet.` prefix, as diffusers writes them.
            let p = if i % 2 == 0 { "unet." } else { "" };
            e.push((format!("{p}{m}.lora_A.weight"), vec![r, inp], a));
            e.push((format!("{p}{m}.lora_B.weight"), vec![out, r], b));
            e.push((format!("{p}{m}.alpha"), vec![], vec![alpha]));
        }
        e
    }

    fn kohya_entries(r: usize) -> Vec<Entry> {
        let mut e = Vec::new();
        for (m, a, b, alpha) in factors(r) {
            let inp = a.len() / r;
            let out = b.len() / r;
            let k = kohya_name(m);
            e.push((format!("{k}.lora_down.weight"), vec![r, inp], a));
            e.push((format!("{k}.lora_up.weight"), vec![out, r], b));
            e.push((format!("{k}.alpha"), vec![], vec![alpha]));
        }
        e
    }

    fn load(entries: &[Entry]) -> Result<LoraAdapter> {
        LoraAdapter::from_bytes(
            &serialize(entries, None),
            "mem/test-lora.safetensors",
            &weight_map(),
        )
    }

    fn load_err(entries: &[Entry]) -> String {
        match load(entries) {
            Ok(_) => panic!("loaded where an error was expected"),
            Err(e) => {
                assert!(matches!(e, Error::Lora { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn peft_and_kohya_give_the_same_layers() {
        let peft = load(&peft_entries(3)).unwrap();
        let kohya = load(&kohya_entries(3)).unwrap();
        assert_eq!(peft.layout(), LoraLayout::Peft);
        assert_eq!(kohya.layout(), LoraLayout::Kohya);
        assert_eq!(peft.layers.len(), MODULES.len());
        assert_eq!(peft.layers, kohya.layers);
        for (m, a, b, alpha) in factors(3) {
            let l = &kohya.layers[&format!("{m}.weight")];
            assert_eq!((l.rank, l.alpha), (3, alpha));
            assert_eq!((&l.a, &l.b), (&a, &b));
        }
        assert_eq!(kohya.name, "test-lora");
        assert_eq!(kohya.path, PathBuf::from("mem/test-lora.safetensors"));
        let floats: usize = MODULES.iter().map(|&(_, o, i)| 3 * (o + i)).sum();
        assert_eq!(kohya.nbytes(), 4 * floats);
        assert_eq!(peft.nbytes(), kohya.nbytes());
    }

    #[test]
    fn kohya_alpha_comes_from_its_alpha_key() {
        let mut e = kohya_entries(2);
        let k = format!("{}.alpha", kohya_name(FF));
        e.iter_mut().find(|x| x.0 == k).unwrap().2 = vec![7.25];
        // Without an `.alpha`, alpha defaults to the rank.
        let q = format!("{}.alpha", kohya_name(Q));
        e.retain(|x| x.0 != q);
        let l = load(&e).unwrap();
        assert_eq!(l.layers[&format!("{FF}.weight")].alpha, 7.25);
        assert_eq!(l.layers[&format!("{Q}.weight")].alpha, 2.0);
        assert_eq!(l.layers[&format!("{OUT}.weight")].alpha, 3.5);
    }

    #[test]
    fn peft_alpha_falls_back_to_metadata_then_rank() {
        let e: Vec<Entry> = peft_entries(2)
            .into_iter()
            .filter(|x| !x.0.ends_with(".alpha"))
            .collect();
        let w = weight_map();
        let meta = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.lora_alpha": 16.0, "unet.r": 2}"#.to_string(),
        )]);
        let l = LoraAdapter::from_bytes(&serialize(&e, Some(meta)), "m", &w).unwrap();
        assert!(l.layers.values().all(|l| l.alpha == 16.0));
        let l = LoraAdapter::from_bytes(&serialize(&e, None), "m", &w).unwrap();
        assert!(l.layers.values().all(|l| l.alpha == 2.0));
    }

    #[test]
    fn unmatched_keys_are_named() {
        for mut e in [peft_entries(2), kohya_entries(2)] {
            let kohya = e[0].0.starts_with("lora_unet_");
            let key = if kohya {
                "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight".to_string()
            } else {
                "up_blocks.9.attentions.0.proj_in.lora_A.weight".to_string()
            };
            e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
            let m = load_err(&e);
            assert!(m.contains("1 keys match no weight") && m.contains(&key), "{m}");
        }
        // kohya keys with SGM block names, where the weight map (no up blocks) does not settle the
        // layers per block, are named, and the error says why.
        let mut e = kohya_entries(2);
        let key = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight".to_string();
        e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
        let m = load_err(&e);
        assert!(m.contains("1 keys match no weight") && m.contains(&key), "{m}");
        assert!(
            m.contains("SGM")
                && m.contains("weight map does not determine")
                && m.contains("no up-block attention weights"),
            "{m}"
        );
    }

    #[test]
    fn kohya_text_encoder_keys_of_a_bundle_without_text_weights_are_refused() {
        let mut e = kohya_entries(2);
        let keys = [
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha",
        ];
        for k in keys {
            e.push((k.to_string(), vec![2, 6], vec![0.0; 12]));
        }
        let m = load_err(&e);
        assert!(m.contains("3 keys adapt a text encoder"), "{m}");
        assert!(
            m.contains("this bundle's text encoders take no LoRA weights"),
            "{m}"
        );
        for k in keys {
            assert!(m.contains(k), "{m}");
        }
        // with `unet_only` the text-encoder part is skipped and recorded
        let a = LoraAdapter::from_bytes_with(&serialize(&e, None), "t", &weight_map(), LoraParts::Takeable)
            .unwrap();
        assert_eq!(a.layers.len(), MODULES.len());
        assert_eq!(a.untaken.text_encoder, keys.map(String::from).to_vec());
        assert!(!a.has_text_encoder_layers());
        // A file of text-encoder keys only is refused too.
        let m = load_err(&[(keys[0].to_string(), vec![2, 6], vec![0.0; 12])]);
        assert!(m.contains("adapt a text encoder"), "{m}");
    }

    /// A bundle whose text encoders take weights: kohya `lora_te1_`/`lora_te_`/`lora_te2_` and peft
    /// `text_encoder[_2].` keys land on them (with or without `text_model.`), with each part's
    /// alpha from the metadata in the peft layout.
    #[test]
    fn text_encoder_keys_map_onto_the_text_encoders_weights() {
        let mut map = weight_map();
        let te1 = "text_encoder.encoder.layers.0.self_attn.q_proj.weight";
        let te2 = "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.weight";
        for (w, g) in [(te1, "text_encoder"), (te2, "text_encoder_2")] {
            map.insert(
                w.to_string(),
                WeightEntry {
                    graph: g.into(),
                    shape: vec![4, 6],
                },
            );
        }
        let f = |k: &str, s: Vec<usize>| (k.to_string(), s.clone(), values(s.iter().product(), 9));
        let kohya = vec![
            f(
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                vec![2, 6],
            ),
            f(
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                vec![4, 2],
            ),
            (
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha".into(),
                vec![],
                vec![1.0],
            ),
            f("lora_te2_encoder_layers_0_mlp_fc1.lora_down.weight", vec![2, 6]),
            f("lora_te2_encoder_layers_0_mlp_fc1.lora_up.weight", vec![4, 2]),
        ];
        let a = LoraAdapter::from_bytes(&serialize(&kohya, None), "k.safetensors", &map).unwrap();
        assert_eq!(a.layers.keys().collect::<Vec<_>>(), [te1, te2]);
        assert_eq!((a.layers[te1].alpha, a.layers[te2].alpha), (1.0, 2.0));
        assert!(a.has_text_encoder_layers());
        // `lora_te_` is the first encoder too
        let old = vec![
            f(
                "lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                vec![2, 6],
            ),
            f(
                "lora_te_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                vec![4, 2],
            ),
        ];
        let a = LoraAdapter::from_bytes(&serialize(&old, None), "o.safetensors", &map).unwrap();
        assert_eq!(a.layers.keys().collect::<Vec<_>>(), [te1]);

        let peft = vec![
            f(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
                vec![2, 6],
            ),
            f(
                "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight",
                vec![4, 2],
            ),
            f(
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight",
                vec![2, 6],
            ),
            f(
                "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight",
                vec![4, 2],
            ),
            f(&format!("unet.{Q}.lora_A.weight"), vec![2, 6]),
            f(&format!("unet.{Q}.lora_B.weight"), vec![8, 2]),
        ];
        let meta = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.lora_alpha": 8, "text_encoder.lora_alpha": 1, "text_encoder_2.lora_alpha": 3}"#
                .to_string(),
        )]);
        let a = LoraAdapter::from_bytes(&serialize(&peft, Some(meta)), "p.safetensors", &map).unwrap();
        let q = format!("{Q}.weight");
        assert_eq!(
            (a.layers[te1].alpha, a.layers[te2].alpha, a.layers[&q].alpha),
            (1.0, 3.0, 8.0)
        );
        // a text-encoder module the bundle does not have is named
        let bad = vec![f(
            "lora_te2_encoder_layers_5_mlp_fc1.lora_down.weight",
            vec![2, 6],
        )];
        let m = LoraAdapter::from_bytes(&serialize(&bad, None), "b.safetensors", &map)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("lora_te2_encoder_layers_5_mlp_fc1.lora_down.weight") && m.contains("match no weight"),
            "{m}"
        );
    }

    #[test]
    fn other_adapter_kinds_are_told_apart_by_their_factor_names() {
        assert_eq!(
            other_kind("lora_unet_a_b.hada_w1_a"),
            Some(("LoHa", "lora_unet_a_b"))
        );
        assert_eq!(other_kind("unet.a.b.hada_w2_b"), Some(("LoHa", "unet.a.b")));
        assert_eq!(other_kind("lora_unet_a.lokr_w1"), Some(("LoKr", "lora_unet_a")));
        assert_eq!(other_kind("lora_unet_a.lokr_w2_a"), Some(("LoKr", "lora_unet_a")));
        assert_eq!(
            other_kind("lora_unet_a.dora_scale"),
            Some(("DoRA", "lora_unet_a"))
        );
        // peft's DoRA magnitudes are read, not refused
        assert_eq!(other_kind("unet.a.lora_magnitude_vector.weight"), None);
        assert_eq!(other_kind("lora_unet_a.lora_down.weight"), None);
        assert_eq!(other_kind("unet.a.lora_A.weight"), None);
    }

    /// peft's DoRA: `lora_magnitude_vector` (`[out]`, or `[1, out, 1, 1]` for a convolution) beside
    /// the factors becomes the layer's magnitude; one of another size, or one without factors, is
    /// an error naming the weight; kohya's `dora_scale` is refused by kind.
    #[test]
    fn peft_dora_magnitudes_are_read_with_their_layers() {
        let mut e = peft_entries(2);
        let q_b = e
            .iter()
            .position(|x| x.0.ends_with("attn1.to_q.lora_B.weight"))
            .unwrap();
        let prefix = e[q_b].0.strip_suffix(".lora_B.weight").unwrap().to_string();
        e.push((format!("{prefix}.lora_magnitude_vector"), vec![8], values(8, 40)));
        let a = load(&e).unwrap();
        let q = &a.layers[&format!("{Q}.weight")];
        assert_eq!(q.magnitude.as_deref(), Some(values(8, 40).as_slice()));
        assert!(a.has_dora_layers());
        assert_eq!(a.layers.values().filter(|l| l.magnitude.is_some()).count(), 1);
        // [1, out, 1, 1] as peft stores a convolution's
        let mut c = e.clone();
        c.last_mut().unwrap().1 = vec![1, 8, 1, 1];
        assert!(load(&c).unwrap().has_dora_layers());
        // of another size
        let mut bad = e.clone();
        let last = bad.last_mut().unwrap();
        last.1 = vec![7];
        last.2 = values(7, 41);
        let m = load_err(&bad);
        assert!(
            m.contains(&format!("`{Q}.weight`")) && m.contains("DoRA magnitude [7]"),
            "{m}"
        );
        // without factors
        let mut alone = peft_entries(2);
        alone.retain(|x| !x.0.contains("attn1.to_q."));
        alone.push((format!("{prefix}.lora_magnitude_vector"), vec![8], values(8, 40)));
        let m = load_err(&alone);
        assert!(
            m.contains("has a DoRA magnitude") && m.contains(&format!("`{Q}.weight`")),
            "{m}"
        );
        // kohya's dora_scale
        let mut k = kohya_entries(2);
        k.push((format!("{}.dora_scale", kohya_name(Q)), vec![1, 6], values(6, 42)));
        let m = load_err(&k);
        assert!(m.contains("DoRA factors") && m.contains("dora_scale"), "{m}");
    }

    #[test]
    fn mixed_layouts_are_refused() {
        let mut e = kohya_entries(2);
        e.extend(peft_entries(2).into_iter().take(2));
        let m = load_err(&e);
        assert!(
            m.contains("mixes the diffusers/peft layout") && m.contains("kohya layout"),
            "{m}"
        );
        assert!(
            m.contains("lora_A.weight") && m.contains("lora_down.weight"),
            "{m}"
        );
    }

    /// Kohya LoCon factors of `module` (down `[2, 4, kh, kw]`, up `[4, 2, 1, 1]`, alpha 1).
    fn locon_entries(module: &str, kh: usize, kw: usize) -> Vec<Entry> {
        let k = kohya_name(module);
        vec![
            (
                format!("{k}.lora_down.weight"),
                vec![2, 4, kh, kw],
                values(8 * kh * kw, 21),
            ),
            (format!("{k}.lora_up.weight"), vec![4, 2, 1, 1], values(8, 22)),
            (format!("{k}.alpha"), vec![], vec![1.0]),
        ]
    }

    const CONV1: &str = "down_blocks.0.resnets.0.conv1";

    #[test]
    fn conv_factors_of_a_bundle_without_conv_weights_are_untaken() {
        let mut e = kohya_entries(2);
        let k = kohya_name(CONV1);
        e.extend(locon_entries(CONV1, 3, 3));
        let m = load_err(&e);
        assert!(m.contains("2 keys are convolution LoRA factors"), "{m}");
        assert!(m.contains(&format!("{k}.lora_down.weight [2, 4, 3, 3]")), "{m}");
        assert!(
            m.contains("this bundle's convolutions take no LoRA weights") && m.contains("unet_only"),
            "{m}"
        );
        assert!(!m.contains("match no weight"), "{m}");
        // the same file with `unet_only`: its linear layers, the convolution part recorded
        let bytes = serialize(&e, None);
        let a = LoraAdapter::from_bytes_with(&bytes, "m", &weight_map(), LoraParts::Takeable).unwrap();
        assert_eq!(a.layers.len(), MODULES.len());
        assert_eq!(a.untaken.conv.len(), 2);
        assert!(a.untaken.text_encoder.is_empty());
        assert!(
            a.untaken.to_string().starts_with("2 convolution keys ("),
            "{}",
            a.untaken
        );
        assert!(a.check(LoraParts::All).is_err());
        // a file of nothing else: no layers, no error
        let a = LoraAdapter::from_bytes_with(
            &serialize(&locon_entries(CONV1, 3, 3), None),
            "c",
            &weight_map(),
            LoraParts::Takeable,
        )
        .unwrap();
        assert!(a.layers.is_empty() && a.untaken.conv.len() == 2);
        // a convolution factor onto a linear weight of the bundle does not fit it
        let mut e = kohya_entries(2);
        let down = format!("{}.lora_down.weight", kohya_name(PROJ_IN));
        let x = e.iter_mut().find(|x| x.0 == down).unwrap();
        x.1 = vec![2, 6, 1, 1];
        let m = load_err(&e);
        assert!(
            m.contains(&format!("`{PROJ_IN}.weight`")) && m.contains("does not make the weight's"),
            "{m}"
        );
    }

    /// A resnet's `time_emb_proj` (LoCon adapts it) on a bundle that does not take those weights:
    /// untaken, in both layouts; on one that does, a layer.
    #[test]
    fn time_emb_proj_factors_of_a_bundle_without_them_are_untaken() {
        const TEMB: &str = "down_blocks.0.resnets.0.time_emb_proj";
        let temb = |p: &str, a: &str, b: &str| -> Vec<Entry> {
            vec![
                (format!("{p}.{a}"), vec![2, 6], values(12, 30)),
                (format!("{p}.{b}"), vec![4, 2], values(8, 31)),
                (format!("{p}.alpha"), vec![], vec![1.0]),
            ]
        };
        let mut kohya = kohya_entries(2);
        kohya.extend(temb(&kohya_name(TEMB), "lora_down.weight", "lora_up.weight"));
        let mut peft = peft_entries(2);
        peft.extend(temb(&format!("unet.{TEMB}"), "lora_A.weight", "lora_B.weight"));
        for e in [&kohya, &peft] {
            let m = load_err(e);
            assert!(
                m.contains("2 keys adapt the resnets' time_emb_proj") && !m.contains("match no weight"),
                "{m}"
            );
            let bytes = serialize(e, None);
            let a = LoraAdapter::from_bytes_with(&bytes, "t", &weight_map(), LoraParts::Takeable).unwrap();
            assert_eq!((a.layers.len(), a.untaken.time_emb.len()), (MODULES.len(), 2));
            assert!(
                a.untaken.to_string().contains("2 time_emb_proj keys"),
                "{}",
                a.untaken
            );
            let mut w = weight_map();
            w.insert(
                format!("{TEMB}.weight"),
                WeightEntry {
                    graph: "unet_encoder".into(),
                    shape: vec![4, 6],
                },
            );
            let a = LoraAdapter::from_bytes(&bytes, "t", &w).unwrap();
            assert_eq!(a.layers.len(), MODULES.len() + 1);
        }
    }

    /// Hard problems and untaken parts in one file: one error names both, whatever the parts.
    #[test]
    fn untaken_parts_are_named_beside_other_problems() {
        let mut e = kohya_entries(2);
        e.extend(locon_entries(CONV1, 3, 3));
        let key = "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight".to_string();
        e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
        let bytes = serialize(&e, None);
        let m = LoraAdapter::from_bytes_with(&bytes, "m", &weight_map(), LoraParts::Takeable)
            .unwrap_err()
            .to_string();
        assert!(m.contains(&key) && m.contains("convolution LoRA factors"), "{m}");
    }

    /// A weight map with a 3×3 and a 1×1 convolution beside the linear weights.
    fn conv_weight_map() -> BTreeMap<String, WeightEntry> {
        let mut w = weight_map();
        for (m, s) in [(CONV1, vec![4, 4, 3, 3]), (SHORTCUT, vec![4, 4, 1, 1])] {
            w.insert(
                format!("{m}.weight"),
                WeightEntry {
                    graph: "unet_encoder".into(),
                    shape: s,
                },
            );
        }
        w
    }

    const SHORTCUT: &str = "down_blocks.0.resnets.0.conv_shortcut";

    /// LoCon factors onto convolution weights: the down factor as `[r, in·kh·kw]`, the up factor
    /// as `[out, r]`, in both layouts alike.
    #[test]
    fn conv_factors_map_onto_conv_weights_in_both_layouts() {
        let w = conv_weight_map();
        let mut e = kohya_entries(2);
        e.extend(locon_entries(CONV1, 3, 3));
        e.extend(locon_entries(SHORTCUT, 1, 1));
        let kohya = LoraAdapter::from_bytes(&serialize(&e, None), "k", &w).unwrap();
        let l = &kohya.layers[&format!("{CONV1}.weight")];
        assert_eq!(
            (l.rank, l.alpha, l.a.len(), l.b.len()),
            (2, 1.0, 2 * 4 * 9, 4 * 2)
        );
        assert_eq!(l.a, values(72, 21));
        assert_eq!(kohya.layers[&format!("{SHORTCUT}.weight")].a.len(), 2 * 4);
        assert!(kohya.untaken.is_empty());
        // the peft layout: `unet.<module>.lora_A.weight` [r, in, kh, kw], `.lora_B.weight` [out, r, 1, 1]
        let peft: Vec<Entry> = e
            .iter()
            .map(|(k, s, v)| {
                let k = k
                    .replace(".lora_down.weight", ".lora_A.weight")
                    .replace(".lora_up.weight", ".lora_B.weight");
                let module = MODULES
                    .iter()
                    .map(|m| m.0)
                    .chain([CONV1, SHORTCUT])
                    .find(|m| k.starts_with(&format!("{}.", kohya_name(m))))
                    .unwrap();
                (
                    k.replacen(&kohya_name(module), &format!("unet.{module}"), 1),
                    s.clone(),
                    v.clone(),
                )
            })
            .collect();
        let p = LoraAdapter::from_bytes(&serialize(&peft, None), "k", &w).unwrap();
        assert_eq!(p.layers, kohya.layers);
        // a kernel of another size does not fit
        let mut bad = kohya_entries(2);
        bad.extend(locon_entries(CONV1, 1, 1));
        let m = LoraAdapter::from_bytes(&serialize(&bad, None), "b", &w)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains(&format!("`{CONV1}.weight`"))
                && m.contains("[4, 4, 3, 3]")
                && m.contains("another architecture?"),
            "{m}"
        );
        // on a bundle that takes convolutions, a convolution matching none of them is unmatched
        let mut other = kohya_entries(2);
        other.extend(locon_entries("down_blocks.0.resnets.1.conv1", 3, 3));
        let m = LoraAdapter::from_bytes(&serialize(&other, None), "o", &w)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("match no weight") && m.contains("resnets_1_conv1"),
            "{m}"
        );
    }

    #[test]
    fn shape_mismatch_names_another_architecture() {
        for mut e in [peft_entries(2), kohya_entries(2)] {
            // B of `to_q` with 9 rows where the weight has 8.
            let x = e
                .iter_mut()
                .find(|x| {
                    x.0.ends_with("attn1.to_q.lora_B.weight") || x.0.ends_with("attn1_to_q.lora_up.weight")
                })
                .unwrap();
            x.1 = vec![9, 2];
            x.2 = vec![0.0; 18];
            let m = load_err(&e);
            assert!(
                m.contains(&format!("`{Q}.weight`")) && m.contains("another architecture?"),
                "{m}"
            );
        }
    }

    #[test]
    fn kohya_name_of_two_weights_is_refused() {
        let mut w = weight_map();
        for m in ["mid.a_b.c", "mid.a.b_c"] {
            w.insert(
                format!("{m}.weight"),
                WeightEntry {
                    graph: "unet_encoder".into(),
                    shape: vec![4, 4],
                },
            );
        }
        let key = "lora_unet_mid_a_b_c.lora_down.weight".to_string();
        let bytes = serialize(&[(key.clone(), vec![1, 4], vec![0.0; 4])], None);
        let m = LoraAdapter::from_bytes(&bytes, "m", &w).unwrap_err().to_string();
        assert!(m.contains(&key) && m.contains("more than one weight"), "{m}");
    }

    #[test]
    fn non_finite_factors_are_refused() {
        let mut e = peft_entries(2);
        e[0].2[1] = f32::NAN;
        e[1].2[0] = f32::INFINITY;
        let m = load_err(&e);
        assert!(
            m.contains("non-finite values") && (m.contains(&e[0].0) || m.contains(&e[1].0)),
            "{m}"
        );
    }

    #[test]
    fn missing_factor_is_named() {
        let mut e = kohya_entries(2);
        let up = format!("{}.lora_up.weight", kohya_name(OUT));
        e.retain(|x| x.0 != up);
        let m = load_err(&e);
        assert!(
            m.contains(&format!("`{OUT}.weight` has lora_down but no lora_up")),
            "{m}"
        );
    }

    /// Each bad input the issue lists gives an error naming the file and the problem (the
    /// origin `mem/test-lora.safetensors` is in every message).
    #[test]
    fn bad_inputs_name_the_file_and_the_problem() {
        let file = "mem/test-lora.safetensors";
        let named = |m: &str, what: &str| {
            assert!(m.contains(file) && m.contains(what), "want {what:?}: {m}");
        };
        // A and B of different ranks
        let mut e = peft_entries(2);
        let b = e
            .iter_mut()
            .find(|x| x.0.ends_with("attn1.to_q.lora_B.weight"))
            .unwrap();
        b.1 = vec![8, 3];
        b.2 = vec![0.5; 24];
        named(
            &load_err(&e),
            "lora_B [8, 3] · lora_A [2, 6] does not make the weight's [8, 6]",
        );
        // a LoRA for another architecture: none of its keys matches a weight of the bundle
        let sd15 = vec![
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
                    .to_string(),
                vec![2, 320],
                vec![0.0; 640],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
                    .to_string(),
                vec![320, 2],
                vec![0.0; 640],
            ),
        ];
        named(&load_err(&sd15), "is the LoRA for another architecture?");
        // NaN or ±inf in a factor
        let mut e = kohya_entries(2);
        e[1].2[3] = f32::NEG_INFINITY;
        named(&load_err(&e), "non-finite values");
        // duplicate keys: one factor with and without the `unet.` prefix
        let mut e = peft_entries(2);
        let k = e[0].0.strip_prefix("unet.").unwrap().to_string();
        let dup = (k.clone(), e[0].1.clone(), e[0].2.clone());
        e.push(dup);
        named(
            &load_err(&e),
            &format!("a second key for the same factor of `{Q}.weight`"),
        );
        // a truncated file: the header says more bytes than the file has, or the data is cut
        let bytes = serialize(&peft_entries(2), None);
        let w = weight_map();
        for cut in [bytes.len() / 2, 20, 4] {
            let m = LoraAdapter::from_bytes(&bytes[..cut], file, &w)
                .unwrap_err()
                .to_string();
            named(&m, "not a safetensors file");
        }
        // a corrupt header (not JSON)
        let mut bad = bytes.clone();
        bad[8] = b'#';
        let m = LoraAdapter::from_bytes(&bad, file, &w).unwrap_err().to_string();
        named(&m, "not a safetensors file");
    }

    #[test]
    fn not_safetensors_and_no_file() {
        let w = weight_map();
        let e = LoraAdapter::from_bytes(b"nope", "x.safetensors", &w).unwrap_err();
        assert!(e.to_string().contains("not a safetensors file"), "{e}");
        let e = LoraAdapter::load(Path::new("/nonexistent/x.safetensors"), &w).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }

    /// The committed peft LoRA, rewritten with kohya keys, maps onto the tiny bundle identically.
    #[test]
    fn tiny_lora_in_kohya_layout_matches_peft() {
        let bundle = crate::bundle::BaseBundle::open("../bundles/tiny-sdxl").unwrap();
        let weights = &bundle.manifest.weights.map;
        let path = Path::new("../bundles/loras/tiny-lora-a.safetensors");
        let peft = LoraAdapter::load(path, weights).unwrap();
        assert_eq!(peft.layout(), LoraLayout::Peft);
        assert_eq!(peft.name, "tiny-lora-a");

        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut e: Vec<Entry> = Vec::new();
        for (key, t) in st.tensors() {
            let k = key.strip_prefix("unet.").unwrap_or(&key);
            let (module, suffix) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, "lora_down.weight")
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, "lora_up.weight")
            } else {
                panic!("unexpected key {key}");
            };
            let data = to_f32(t.dtype(), t.data()).unwrap();
            e.push((
                format!("{}.{suffix}", kohya_name(module)),
                t.shape().to_vec(),
                data,
            ));
            if suffix == "lora_down.weight" {
                // The peft file's alpha is in its metadata; kohya has one per module.
                e.push((
                    format!("{}.alpha", kohya_name(module)),
                    vec![],
                    vec![peft.layers.values().next().unwrap().alpha],
                ));
            }
        }
        let kohya = LoraAdapter::from_bytes(&serialize(&e, None), "tiny-lora-a-kohya", weights).unwrap();
        assert_eq!(kohya.layout(), LoraLayout::Kohya);
        assert_eq!(kohya.name, "tiny-lora-a-kohya");
        // every linear UNet weight but the LoCon targets (the tiny LoRA has no text-encoder part)
        let unet = weights
            .iter()
            .filter(|(n, e)| {
                e.graph.starts_with("unet_") && e.shape.len() == 2 && !n.contains("time_emb_proj")
            })
            .count();
        assert_eq!(peft.layers.len(), unet);
        assert!(peft.layers.values().all(|l| l.alpha == 8.0 && l.rank == 4));
        assert_eq!(
            kohya.layers.keys().collect::<Vec<_>>(),
            peft.layers.keys().collect::<Vec<_>>()
        );
        for (w, l) in &peft.layers {
            assert_eq!(&kohya.layers[w], l, "{w}");
        }
        assert_eq!(kohya.nbytes(), peft.nbytes());
    }
}
