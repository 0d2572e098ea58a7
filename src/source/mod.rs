//! Metric sources: where samples come from. Each returns typed [`crate::model::Sample`]s with
//! timestamps; missing data is a value, never a zero.

pub mod custom;
pub mod history;
pub mod pods;
pub mod prometheus;
pub mod query;
pub mod resource;
pub mod trace;

/// Drives a reflector's watch stream on the runtime until the handle is aborted. Errors are
/// logged; the stream retries them with its backoff.
pub fn spawn_watch<K, S>(stream: S, what: &'static str) -> tokio::task::JoinHandle<()>
where
    S: futures::Stream<Item = Result<K, kube::runtime::watcher::Error>> + Send + 'static,
{
    use futures::StreamExt as _;
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %crate::api_error::human_watch(&e), "{what} watch error (retrying with backoff)");
            }
        }
    })
}
