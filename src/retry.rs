//! The one retry mechanism: exponential backoff (100 ms, doubling, at most 5 s between
//! attempts; or, for trouble that lasts, 1 s doubling to 30 s), for as long as the caller
//! allows, and never past shutdown.

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable};

use crate::shutdown::Shutdown;

/// How long (and how often) an operation may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Until it succeeds or shutdown starts.
    UntilShutdown,
    /// Until the time spent waiting between attempts would exceed this.
    Within(Duration),
    /// Until shutdown, for trouble that lasts (nothing bound to receive the events): 1 s
    /// between the first attempts, doubling to 30 s, so holding many messages costs little.
    Slowly,
}

fn backoff(budget: Budget) -> ExponentialBuilder {
    let builder = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .without_max_times();
    match budget {
        Budget::UntilShutdown => builder,
        Budget::Within(total) => builder.with_total_delay(Some(total)),
        Budget::Slowly => {
            builder.with_min_delay(Duration::from_secs(1)).with_max_delay(Duration::from_secs(30)).with_jitter()
        }
    }
}

/// Runs `op` until it succeeds, fails with an error `retryable` refuses, or the budget is
/// spent (the last error is returned); `notify` hears of every failed attempt and the wait
/// before the next. `None` when shutdown started first.
pub async fn retry<T, E, F, Fut>(
    stop: &Shutdown,
    budget: Budget,
    retryable: impl FnMut(&E) -> bool,
    notify: impl FnMut(&E, Duration),
    op: F,
) -> Option<Result<T, E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let attempts = op.retry(backoff(budget)).sleep(tokio::time::sleep).when(retryable).notify(notify);
    tokio::select! {
        _ = stop.wait() => None,
        result = attempts => Some(result),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let calls = AtomicU32::new(0);
        let op = || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err("down")
            } else {
                Ok(7)
            }
        };
        let mut waits = Vec::new();
        let out = retry(&Shutdown::new(), Budget::UntilShutdown, |_| true, |_, d| waits.push(d.as_millis()), op).await;
        assert_eq!(out, Some(Ok(7)));
        assert_eq!(waits, [100, 200, 400], "doubling from 100 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_error_ends_at_once_and_a_budget_runs_out() {
        let calls = AtomicU32::new(0);
        let op = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>("bad input")
        };
        assert_eq!(
            retry(&Shutdown::new(), Budget::UntilShutdown, |_| false, |_, _| {}, op).await,
            Some(Err("bad input"))
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let op = || async { Err::<(), _>("down") };
        let out = retry(&Shutdown::new(), Budget::Within(Duration::from_secs(30)), |_| true, |_, _| {}, op).await;
        assert_eq!(out, Some(Err("down")));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts() {
        let stop = Shutdown::new();
        stop.trigger();
        let op = || async { Err::<(), _>("down") };
        assert_eq!(retry(&stop, Budget::UntilShutdown, |_| true, |_, _| {}, op).await, None);
    }
}
