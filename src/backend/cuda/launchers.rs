//! Typed kernel launches. build.rs reads every `extern "C" __global__` signature of `kernels/*.cu` and generates
//! one argument struct per kernel (per family, for kernels instantiated per head dim) with the C parameters' names,
//! types and order (`build/launchers.rs`), the `Epilogue` enum of `common.cuh`, and the list of kernels the
//! backend loads. A signature that changes without the Rust side changing with it fails to compile, and a kernel
//! no op launches is a struct never constructed, which the `dead_code` lint denies (see `mod.rs`).

/// The 16-bit type of activations, weights and the KV cache on the device: every `ACT_KERNEL` of `kernels/` is
/// built for each (the `.cu` files compiled as is and with `-DFE_ACT_F16`), and a backend runs one of them.
/// bf16 has f32's range; f16 three more mantissa bits (eight times finer rounding), and overflows past 65504.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActDtype {
    #[default]
    Bf16,
    F16,
}

impl ActDtype {
    pub const ALL: [ActDtype; 2] = [ActDtype::Bf16, ActDtype::F16];

    /// The symbol suffix and the name users give (`--dtype`).
    pub fn name(self) -> &'static str {
        match self {
            ActDtype::Bf16 => "bf16",
            ActDtype::F16 => "f16",
        }
    }

    /// The compiler options that build a kernel file for this type (nvcc and NVRTC alike).
    pub fn defines(self) -> &'static [&'static str] {
        match self {
            ActDtype::Bf16 => &[],
            ActDtype::F16 => &["-DFE_ACT_F16"],
        }
    }

    /// `v` rounded to nearest even, as the device stores it (little-endian bits).
    pub fn encode(self, v: f32) -> u16 {
        match self {
            ActDtype::Bf16 => half::bf16::from_f32(v).to_bits(),
            ActDtype::F16 => half::f16::from_f32(v).to_bits(),
        }
    }

    pub fn decode(self, bits: u16) -> f32 {
        match self {
            ActDtype::Bf16 => half::bf16::from_bits(bits).to_f32(),
            ActDtype::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    /// A quiet NaN: what fresh tensors are filled with when poisoning is on.
    pub fn nan_bits(self) -> u16 {
        match self {
            ActDtype::Bf16 => 0x7fc0,
            ActDtype::F16 => 0x7e00,
        }
    }
}

impl std::str::FromStr for ActDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ActDtype::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| format!("unknown activation dtype {s:?} (bf16, f16)"))
    }
}

impl std::fmt::Display for ActDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One kernel argument, by value, as the kernel's C signature types it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A device pointer (0 = null).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    pub fn ptr(p: u64) -> Arg {
        Arg::Ptr(p)
    }

    /// A size or index as the kernel's `int`: every tensor dimension fits, checked, never silently truncated.
    pub fn int(kernel: &str, param: &str, v: usize) -> Arg {
        Arg::I32(
            i32::try_from(v).unwrap_or_else(|_| {
                panic!("{kernel}: {param} = {v} does not fit the kernel's int")
            }),
        )
    }

    pub fn long(kernel: &str, param: &str, v: usize) -> Arg {
        Arg::I64(i64::try_from(v).unwrap_or_else(|_| {
            panic!("{kernel}: {param} = {v} does not fit the kernel's long long")
        }))
    }

    pub fn float(v: f32) -> Arg {
        Arg::F32(v)
    }

    pub fn epilogue(e: Epilogue) -> Arg {
        Arg::I32(e as i32)
    }
}

/// A kernel's arguments, ready to launch: the symbol they go to (in a backend of activation type `act`) and their
/// values in parameter order.
pub trait Kernel {
    fn name(&self, act: ActDtype) -> &'static str;
    fn args(&self) -> Vec<Arg>;
}

include!(concat!(env!("OUT_DIR"), "/launchers.rs"));
