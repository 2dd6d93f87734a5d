//! The WebGPU adapter and device: the device is created with the adapter's real limits (not
//! WebGPU's defaults), and [`DeviceReport`] says what was granted. The device's errors become
//! the engine's: a kernel the device rejects fails [`Engine::new`], and an error of later work
//! fails the next read-back (a browser only logs what no handler takes, and the work it
//! rejected leaves its outputs untouched: zeros).

use std::sync::{Arc, Mutex};

use qlora_core::{Error, Result};

use crate::buffers::ALIGN;
use crate::kernels::Kernels;

/// How the engine uses the device.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Split tensors into buffers of at most this many bytes even where the device allows
    /// larger bindings (tests of the splitting on a small model).
    pub max_binding_size: Option<u64>,
}

/// What the device granted.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    pub adapter: String,
    pub backend: String,
    pub device_type: String,
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub shader_f16: bool,
    /// The largest buffer the engine binds: the smaller of the two size limits (and of
    /// [`EngineOptions::max_binding_size`]), in whole 16-byte units; larger tensors are split
    /// by rows.
    pub binding_size: u64,
}

impl std::fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}): max_buffer_size {} B, max_storage_buffer_binding_size {} B, \
             {} storage buffers per stage, shader-f16 {}; tensors split above {} B",
            self.adapter,
            self.backend,
            self.device_type,
            self.max_buffer_size,
            self.max_storage_buffer_binding_size,
            self.max_storage_buffers_per_shader_stage,
            if self.shader_f16 { "yes" } else { "no" },
            self.binding_size
        )
    }
}

/// A device with qlora's kernels compiled for it. Cheap to clone (wgpu objects are handles).
#[derive(Clone)]
pub struct Engine {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) errors: DeviceErrors,
    report: DeviceReport,
}

/// The first error the device reported outside an error scope since the last check (WebGPU
/// reports errors asynchronously; natively wgpu would panic on them).
#[derive(Clone, Default)]
pub(crate) struct DeviceErrors(Arc<Mutex<Option<String>>>);

impl DeviceErrors {
    /// Takes over `device`'s errors.
    fn install(device: &wgpu::Device) -> DeviceErrors {
        let errors = DeviceErrors::default();
        let first = Arc::clone(&errors.0);
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let mut first = first.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| error.to_string());
        }));
        errors
    }

    /// `Err` with the first error reported since the last check.
    pub(crate) fn check(&self) -> Result<()> {
        let mut first = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match first.take() {
            Some(error) => Err(Error::Invalid(format!(
                "the WebGPU device reported: {error}"
            ))),
            None => Ok(()),
        }
    }
}

/// The system's preferred adapter, or `None` where there is none (no GPU driver, no software
/// Vulkan, a browser without WebGPU).
pub async fn request_adapter() -> Option<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        })
        .await
        .ok()
}

impl Engine {
    /// An engine on the system's preferred adapter.
    pub async fn new(options: EngineOptions) -> Result<Engine> {
        let adapter = request_adapter()
            .await
            .ok_or_else(|| Error::Invalid("no WebGPU adapter is available".into()))?;
        Engine::from_adapter(&adapter, options).await
    }

    /// An engine on `adapter`, whose device gets all the adapter's limits.
    pub async fn from_adapter(adapter: &wgpu::Adapter, options: EngineOptions) -> Result<Engine> {
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("qlora"),
                required_features: wgpu::Features::empty(),
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Invalid(format!("WebGPU device request failed: {e}")))?;
        let info = adapter.get_info();
        let granted = device.limits();
        // Whole 16-byte loads (buffers::ALIGN), so that a padded part still binds.
        let binding_size = granted
            .max_storage_buffer_binding_size
            .min(granted.max_buffer_size)
            .min(options.max_binding_size.unwrap_or(u64::MAX))
            / ALIGN as u64
            * ALIGN as u64;
        let report = DeviceReport {
            adapter: info.name,
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            max_buffer_size: granted.max_buffer_size,
            max_storage_buffer_binding_size: granted.max_storage_buffer_binding_size,
            max_storage_buffers_per_shader_stage: granted.max_storage_buffers_per_shader_stage,
            max_compute_workgroups_per_dimension: granted.max_compute_workgroups_per_dimension,
            shader_f16: adapter.features().contains(wgpu::Features::SHADER_F16),
            binding_size,
        };
        let errors = DeviceErrors::install(&device);
        // Each browser compiles WGSL with its own compiler (Chromium: Tint), which may reject
        // what naga accepted.
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(&device);
        if let Some(error) = scope.pop().await {
            return Err(Error::Invalid(format!(
                "the WebGPU device rejected qlora's WGSL kernels: {error}"
            )));
        }
        Ok(Engine {
            device,
            queue,
            kernels: Arc::new(kernels),
            errors,
            report,
        })
    }

    pub fn report(&self) -> &DeviceReport {
        &self.report
    }

    /// The largest buffer the engine creates or binds.
    pub(crate) fn binding_size(&self) -> u64 {
        self.report.binding_size
    }
}
