//! What a change of any `maxage.*` setting sets in motion, in one place: the enforcement
//! policy re-times every client, and the `CLIENT KILL` compatibility filter is registered or
//! removed. (Kept out of both, so that neither imports the other.)

use crate::server::ffi::{self, LogLevel};
use crate::{commands::compat, server::enforcement};

pub fn on_settings_changed() {
    enforcement::apply_settings();
    // Before the module's init (settings from the config file) there is no context yet; init
    // calls this again once there is.
    if ffi::module_ctx_ready() && !compat::apply_setting(&ffi::module_ctx()) {
        ffi::log(
            &ffi::module_ctx(),
            LogLevel::Warning,
            "maxage: the server refused the CLIENT KILL compatibility filter; CLIENT KILL keeps its own grammar",
        );
    }
}
