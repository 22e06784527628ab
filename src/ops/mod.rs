//! Operations. One op per folder (see `README.md` beside this file).

pub mod dilated;
#[cfg(feature = "reference")]
pub mod reference;
#[cfg(not(feature = "reference"))]
pub(crate) mod reference;
