//! WGSL shaders and their wgpu host side. Nothing here yet: the WGSL engine issue fills it.
