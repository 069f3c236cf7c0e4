//! The backend a page runs on, chosen at run time: the browser's WebGPU, or Burn's flex CPU
//! backend compiled to WebAssembly.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::wgpu::WgpuBackend;

use crate::error::{Result, WasmError};
use crate::memory::{self, Footprint, GpuLimits};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// WebGPU through Burn's wgpu runtime (WGSL kernels).
    WebGpu,
    /// Burn's flex backend on WebAssembly SIMD, one thread.
    Cpu,
}

impl FromStr for BackendKind {
    type Err = WasmError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "webgpu" => Ok(Self::WebGpu),
            "cpu" | "wasm" | "flex" => Ok(Self::Cpu),
            _ => Err(WasmError::Input(format!(
                "unknown backend `{s}`; expected webgpu or cpu"
            ))),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WebGpu => "webgpu",
            Self::Cpu => "cpu",
        })
    }
}

/// A started backend.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Which one.
    pub kind: BackendKind,
    /// The Burn device.
    pub device: Device,
    /// The adapter's name and type, for WebGPU.
    pub adapter: Option<String>,
    /// The limits the WebGPU device was created with (the adapter's own).
    pub limits: Option<GpuLimits>,
}

thread_local! {
    // Burn registers a wgpu runtime once per thread of a page; later loads reuse it.
    static WEBGPU: RefCell<Option<Backend>> = const { RefCell::new(None) };
}

/// Starts `kind` (WebGPU asynchronously, once per page).
pub async fn start(kind: BackendKind) -> Result<Backend> {
    match kind {
        BackendKind::Cpu => Ok(Backend {
            kind,
            device: Device::flex(),
            adapter: None,
            limits: None,
        }),
        BackendKind::WebGpu => {
            if let Some(started) = WEBGPU.with(|w| w.borrow().clone()) {
                return Ok(started);
            }
            let (device, setup) = Device::wgpu_options()
                .graphics_api(WgpuBackend::WebGpu)
                .init_with_setup_async()
                .await
                .map_err(|e| WasmError::Backend(format!("WebGPU could not start: {e}")))?;
            // The runtime asked the adapter for all of its limits; these are what it got.
            let l = setup.device.limits();
            let info = setup.adapter.get_info();
            let started = Backend {
                kind,
                device,
                // Browsers hide most adapter details; the type is always there.
                adapter: Some(if info.name.is_empty() {
                    format!("{:?} adapter", info.device_type)
                } else {
                    format!("{} ({:?})", info.name, info.device_type)
                }),
                limits: Some(GpuLimits {
                    max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
                    max_buffer_size: l.max_buffer_size,
                    max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
                    max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
                }),
            };
            WEBGPU.with(|w| *w.borrow_mut() = Some(started.clone()));
            Ok(started)
        }
    }
}

impl Backend {
    /// Whether a checkpoint of `footprint` fits this backend, with the reason when it does not.
    pub fn check(&self, footprint: &Footprint) -> Result<()> {
        match &self.limits {
            Some(limits) => memory::check_gpu(footprint, limits, memory_in_use()),
            None => memory::check_cpu(footprint, memory_in_use()),
        }
    }
}

/// Bytes of WebAssembly linear memory the module has grown to.
pub fn memory_in_use() -> u64 {
    core::arch::wasm32::memory_size::<0>() as u64 * 65_536
}
