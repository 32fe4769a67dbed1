pub mod acl;
pub mod compat;
pub mod docs;
pub mod kill;
pub mod notice;
pub mod preview;
pub mod self_request;
