//! Backend features → a run-time [`Device`].
//!
//! Every binary takes a `--device` string; this module parses it, checks that the backend is
//! compiled in, and initialises it. Model code never names a backend.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::error::{PhantomError, Result};

/// A device as a user names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// Burn's pure-Rust CPU backend (`flex`).
    Flex,
    /// The ndarray CPU backend (`ndarray`).
    NdArray,
    /// wgpu on the best adapter with the API wgpu picks (`wgpu`).
    Wgpu,
    /// wgpu on a software (CPU) adapter such as Mesa's lavapipe/llvmpipe (`wgpu-cpu`).
    WgpuCpu,
    /// wgpu pinned to Vulkan (`vulkan`).
    Vulkan,
    /// wgpu pinned to Metal (`metal`).
    Metal,
    /// wgpu pinned to DirectX 12 (`dx12`).
    Dx12,
    /// wgpu pinned to OpenGL (`gl`; Mesa's llvmpipe on machines without a GPU).
    Gl,
    /// libtorch on the CPU (`tch`).
    Tch,
    /// libtorch on CUDA device N (`tch-cuda:N`).
    TchCuda(usize),
    /// CubeCL CUDA device N (`cuda:N`).
    Cuda(usize),
}

/// Every device name `--device` accepts, for help texts.
pub const DEVICE_NAMES: &str =
    "flex, ndarray, wgpu, wgpu-cpu, vulkan, metal, dx12, gl, tch, tch-cuda:N, cuda:N";

impl FromStr for DeviceSpec {
    type Err = PhantomError;

    fn from_str(s: &str) -> Result<Self> {
        let index = |rest: &str| -> Result<usize> {
            if rest.is_empty() {
                return Ok(0);
            }
            rest.strip_prefix(':')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| PhantomError::Device(format!("`{s}`: expected an index like `:0`")))
        };
        Ok(match s {
            "flex" | "cpu" => Self::Flex,
            "ndarray" => Self::NdArray,
            "wgpu" => Self::Wgpu,
            "wgpu-cpu" => Self::WgpuCpu,
            "vulkan" => Self::Vulkan,
            "metal" => Self::Metal,
            "dx12" => Self::Dx12,
            "gl" => Self::Gl,
            "tch" | "tch-cpu" => Self::Tch,
            _ if s.starts_with("tch-cuda") => Self::TchCuda(index(&s["tch-cuda".len()..])?),
            _ if s.starts_with("cuda") => Self::Cuda(index(&s["cuda".len()..])?),
            _ => {
                return Err(PhantomError::Device(format!(
                    "unknown device `{s}`; expected one of: {DEVICE_NAMES}"
                )));
            }
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flex => write!(f, "flex"),
            Self::NdArray => write!(f, "ndarray"),
            Self::Wgpu => write!(f, "wgpu"),
            Self::WgpuCpu => write!(f, "wgpu-cpu"),
            Self::Vulkan => write!(f, "vulkan"),
            Self::Metal => write!(f, "metal"),
            Self::Dx12 => write!(f, "dx12"),
            Self::Gl => write!(f, "gl"),
            Self::Tch => write!(f, "tch"),
            Self::TchCuda(i) => write!(f, "tch-cuda:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The float precision a model computes in.
///
/// The released checkpoints are bf16; f32 (the default) computes what the parity tests check.
/// Half precision halves the weights' memory where the backend computes in it (flex, tch, CUDA;
/// wgpu with the adapter's `shader-f16` for f16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16, the checkpoints' own precision.
    Bf16,
}

impl Precision {
    /// Burn's float dtype for it.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Bytes per parameter.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

impl FromStr for Precision {
    type Err = PhantomError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(PhantomError::Device(format!(
                "unknown dtype `{s}`; expected f32, f16 or bf16"
            ))),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// Whether half precision on `device` means half-precision weights with f32 arithmetic: on
/// flex the CPU kernels read f16 and bf16 weights as they are and accumulate in f32, which is
/// as fast as computing in half precision throughout and more precise. (Where the processor
/// has AVX512-BF16, a product with bf16 weights rounds its activations to bf16 for the pair
/// products (`kernels::dpbf16`).)
pub fn mixed_precision(device: &Device) -> bool {
    #[cfg(feature = "cpu-kernels")]
    {
        crate::kernels::is_flex(device)
    }
    #[cfg(not(feature = "cpu-kernels"))]
    {
        let _ = device;
        false
    }
}

/// The precision a checkpoint stored as `stored` runs in on `device` when the user does not
/// choose: its own, where the backend computes in it fast and right (bf16 and f16 on flex and
/// libtorch, f16 on wgpu adapters with `shader-f16`), f32 otherwise.
pub fn auto_precision(device: &Device, stored: Option<DType>) -> Precision {
    let wanted = match stored {
        Some(DType::BF16) => Precision::Bf16,
        Some(DType::F16) => Precision::F16,
        _ => return Precision::F32,
    };
    if mixed_precision(device) || device.supports_dtype(wanted.dtype()) && !is_cpu(device) {
        wanted
    } else {
        Precision::F32
    }
}

/// The dtypes a model loaded onto `device` (set up by [`set_precision`]) uses for `precision`.
pub fn load_options(device: &Device, precision: Precision) -> crate::LoadOptions {
    if mixed_precision(device) && precision != Precision::F32 {
        crate::LoadOptions {
            dtype: DType::F32,
            weights: Some(precision.dtype()),
            quantize: None,
        }
    } else {
        crate::LoadOptions::uniform(precision.dtype())
    }
}

/// Prepares `device` for a model in `precision`: the float dtype of every tensor later created
/// on it (parameters, activations, caches), except on flex, where half precision keeps f32
/// arithmetic (see [`mixed_precision`]). It must come before the first tensor on the device; a
/// backend that cannot compute in it is a clear error.
pub fn set_precision(device: &mut Device, precision: Precision) -> Result<()> {
    if mixed_precision(device) {
        return Ok(());
    }
    let want = precision.dtype();
    if DType::from(device.settings().float_dtype) == want {
        return Ok(());
    }
    device
        .configure(FloatDType::from(want))
        .map_err(|e| match e {
            burn::tensor::DeviceError::UnsupportedDType { device, .. } => {
                PhantomError::Device(format!("{device} cannot compute in {precision}"))
            }
            other => PhantomError::Device(format!("cannot switch to {precision}: {other}")),
        })
}

/// [`device`] computing in `precision`.
pub fn device_with_precision(name: Option<&str>, precision: Precision) -> Result<Device> {
    let mut device = device(name)?;
    set_precision(&mut device, precision).map_err(|e| match e {
        PhantomError::Device(why) => PhantomError::Device(format!(
            "--dtype {precision} on `{}`: {why}; use --dtype f32 or another device",
            name.unwrap_or("auto")
        )),
        other => other,
    })?;
    Ok(device)
}

/// Whether tensors on `device` live in host memory (Burn's CPU backends flex and ndarray),
/// where reading a whole tensor back is a copy in memory rather than a transfer.
pub fn is_cpu(device: &Device) -> bool {
    #[allow(unused_imports)]
    use burn_dispatch::DispatchDevice;
    match device.as_dispatch() {
        #[cfg(feature = "cpu-kernels")]
        DispatchDevice::Flex(_) => true,
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// The backends compiled into this build, best first.
pub fn compiled_backends() -> Vec<DeviceSpec> {
    let mut out = Vec::new();
    if cfg!(feature = "cuda") {
        out.push(DeviceSpec::Cuda(0));
    }
    if cfg!(feature = "wgpu") {
        out.push(DeviceSpec::Wgpu);
    }
    if cfg!(feature = "tch") {
        out.push(DeviceSpec::Tch);
    }
    if cfg!(feature = "flex") {
        out.push(DeviceSpec::Flex);
    }
    if cfg!(feature = "ndarray") {
        out.push(DeviceSpec::NdArray);
    }
    out
}

/// The default device: the first compiled backend that comes up, preferring GPUs.
pub fn default_device() -> Result<Device> {
    let mut errors = Vec::new();
    for spec in compiled_backends() {
        match spec.init() {
            Ok(device) => return Ok(device),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(PhantomError::Device(if errors.is_empty() {
        "no backend is compiled in; build with a feature: flex, ndarray, wgpu, tch, cuda".into()
    } else {
        errors.join("; ")
    }))
}

/// Parses `name` (or picks the default when `None`) and initialises the device.
pub fn device(name: Option<&str>) -> Result<Device> {
    match name {
        None | Some("auto") => default_device(),
        Some(name) => name.parse::<DeviceSpec>()?.init(),
    }
}

fn not_compiled(spec: &DeviceSpec, feature: &str) -> PhantomError {
    PhantomError::Device(format!(
        "`{spec}` needs the `{feature}` feature, which this build lacks (rebuild with \
         `--features {feature}`)"
    ))
}

impl DeviceSpec {
    /// Initialises the backend, failing clearly when it is not compiled in or not present.
    #[allow(deprecated)] // ndarray and tch are deprecated upstream and still supported here
    pub fn init(&self) -> Result<Device> {
        match self {
            Self::Flex => {
                #[cfg(feature = "flex")]
                return Ok(Device::flex());
                #[cfg(not(feature = "flex"))]
                return Err(not_compiled(self, "flex"));
            }
            Self::NdArray => {
                #[cfg(feature = "ndarray")]
                return Ok(Device::ndarray());
                #[cfg(not(feature = "ndarray"))]
                return Err(not_compiled(self, "ndarray"));
            }
            Self::Wgpu | Self::WgpuCpu | Self::Vulkan | Self::Metal | Self::Dx12 | Self::Gl => {
                #[cfg(feature = "wgpu")]
                return wgpu_init(self);
                #[cfg(not(feature = "wgpu"))]
                return Err(not_compiled(self, "wgpu"));
            }
            Self::Tch => {
                #[cfg(feature = "tch")]
                return Ok(Device::libtorch());
                #[cfg(not(feature = "tch"))]
                return Err(not_compiled(self, "tch"));
            }
            Self::TchCuda(_index) => {
                #[cfg(feature = "tch")]
                return tch_cuda_probe(*_index).map(|()| Device::libtorch_cuda(*_index));
                #[cfg(not(feature = "tch"))]
                return Err(not_compiled(self, "tch"));
            }
            Self::Cuda(_index) => {
                #[cfg(feature = "cuda")]
                return cuda_probe(*_index).map(|()| Device::cuda(*_index));
                #[cfg(not(feature = "cuda"))]
                return Err(not_compiled(self, "cuda"));
            }
        }
    }
}

/// libtorch fails deep inside its first operation when the GPU is missing; ask it first.
#[cfg(feature = "tch")]
fn tch_cuda_probe(index: usize) -> Result<()> {
    let count = tch::Cuda::device_count();
    if (index as i64) < count {
        return Ok(());
    }
    Err(PhantomError::Device(format!(
        "`tch-cuda:{index}`: no such device: libtorch sees {count} CUDA device(s), numbered from \
         0 (a CPU-only libtorch, or a machine without an NVIDIA driver, sees none)"
    )))
}

/// CubeCL's CUDA runtime opens the driver lazily and panics when it is missing; asking first
/// turns a machine without an NVIDIA GPU into an error. (Kernels are compiled to PTX by the
/// LLVM linked into the binary, so the CUDA toolkit itself is not needed at run time.)
#[cfg(feature = "cuda")]
fn cuda_probe(index: usize) -> Result<()> {
    use cudarc::driver::{result, sys};

    let fail = |why: String| PhantomError::Device(format!("`cuda:{index}`: {why}"));
    // SAFETY: these only try to open the shared libraries by name.
    if !unsafe { sys::is_culib_present() } {
        return Err(fail(
            "the NVIDIA driver library (libcuda.so / nvcuda.dll) is not installed or not on the \
             library path"
                .into(),
        ));
    }
    result::init().map_err(|e| fail(format!("the CUDA driver did not start: {e}")))?;
    let count =
        result::device::get_count().map_err(|e| fail(format!("counting CUDA devices: {e}")))?;
    if (index as i64) < i64::from(count) {
        Ok(())
    } else {
        Err(fail(format!(
            "no such device: the driver sees {count} CUDA device(s), numbered from 0"
        )))
    }
}

/// A wgpu runtime can be registered once per process: later requests for the same device get
/// the one already started.
#[cfg(feature = "wgpu")]
fn wgpu_init(spec: &DeviceSpec) -> Result<Device> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static STARTED: OnceLock<Mutex<HashMap<String, Device>>> = OnceLock::new();
    let started = STARTED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut started = started
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(device) = started.get(&spec.to_string()) {
        return Ok(device.clone());
    }
    let device = wgpu_start(spec)?;
    started.insert(spec.to_string(), device.clone());
    Ok(device)
}

#[cfg(feature = "wgpu")]
fn wgpu_start(spec: &DeviceSpec) -> Result<Device> {
    use burn::tensor::DeviceKind;
    use burn::tensor::wgpu::WgpuBackend;

    let (api, kind) = match spec {
        DeviceSpec::Wgpu => (WgpuBackend::Auto, DeviceKind::DefaultDevice),
        DeviceSpec::WgpuCpu => (WgpuBackend::Auto, DeviceKind::Cpu),
        DeviceSpec::Vulkan => (WgpuBackend::Vulkan, DeviceKind::DefaultDevice),
        DeviceSpec::Metal => (WgpuBackend::Metal, DeviceKind::DefaultDevice),
        DeviceSpec::Dx12 => (WgpuBackend::Dx12, DeviceKind::DefaultDevice),
        DeviceSpec::Gl => (WgpuBackend::Gl, DeviceKind::DefaultDevice),
        _ => unreachable!("wgpu_init is only called for wgpu devices"),
    };
    Device::wgpu_options()
        .graphics_api(api)
        .device_kind(kind)
        .init()
        .map_err(|e| PhantomError::Device(format!("`{spec}` could not start: {e}")))
}
