//! The WebGPU adapter and device: the device is created with the adapter's real limits (not
//! WebGPU's defaults), and [`DeviceReport`] says what was granted.

use qlora_core::{Error, Result};

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
    /// [`EngineOptions::max_binding_size`]); larger tensors are split by rows.
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
    pub(crate) kernels: Kernels,
    report: DeviceReport,
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
        let binding_size = granted
            .max_storage_buffer_binding_size
            .min(granted.max_buffer_size)
            .min(options.max_binding_size.unwrap_or(u64::MAX));
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
        let kernels = Kernels::new(&device);
        Ok(Engine {
            device,
            queue,
            kernels,
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
