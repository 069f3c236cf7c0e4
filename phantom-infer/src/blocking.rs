//! The generation code is written once, as `async` functions, because a browser can only read
//! GPU results back asynchronously. Native callers use the blocking wrappers, which drive those
//! functions to completion on the calling thread.

use std::future::Future;

/// Runs `future` to completion on the current thread.
///
/// On native targets every backend's readback future resolves by itself (the device work runs
/// on other threads), so parking until it is ready is safe. In a browser only CPU work completes
/// without yielding to the event loop: there, call the `_async` functions instead.
pub fn block_on<T>(future: impl Future<Output = T>) -> T {
    futures_lite::future::block_on(future)
}
