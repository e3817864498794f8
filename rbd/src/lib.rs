pub mod backend;
pub mod lock;
pub mod mem;
