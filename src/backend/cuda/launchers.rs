//! Typed kernel launches. build.rs reads every `extern "C" __global__` signature of `kernels/*.cu` and generates
//! one argument struct per kernel (per family, for kernels instantiated per head dim) with the C parameters' names,
//! types and order (`build/launchers.rs`), the `Epilogue` enum of `common.cuh`, and the list of kernels the
//! backend loads. A signature that changes without the Rust side changing with it fails to compile, and a kernel
//! no op launches is a struct never constructed, which the `dead_code` lint denies (see `mod.rs`).

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

/// A kernel's arguments, ready to launch: the symbol they go to and their values in parameter order.
pub trait Kernel {
    fn name(&self) -> &'static str;
    fn args(&self) -> Vec<Arg>;
}

include!(concat!(env!("OUT_DIR"), "/launchers.rs"));
