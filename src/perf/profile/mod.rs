//! The per-op profiler behind `flamingo profile`: a backend decorator that times every op on the backend's own
//! clock (`decorator`, its `impl Backend` generated from the trait by `build/profiled.rs`), the cost model of what
//! each op has to do (`work`), the per-op table and Chrome trace (`report`), and the run it profiles (`driver`).

pub mod decorator;
pub mod driver;
pub mod report;
pub mod work;

pub use decorator::Profiled;
pub use driver::{profile_steps, Workload};
pub use report::OpRow;
