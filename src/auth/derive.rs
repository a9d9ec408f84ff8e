//! Salting a password pgbastion holds (identity login with a password
//! credential, the auth_query role): PBKDF2 with the server's iteration
//! count, up to `scram::MAX_ITERATIONS`. That is CPU work of up to seconds,
//! so it runs on the blocking pool, never on an async worker where it
//! would stall every other session on that worker (issue 19 item 23), and
//! at most one derivation per CPU runs at a time, so a burst of logins
//! cannot take every core either.

use std::sync::{Arc, OnceLock};

use tokio::sync::Semaphore;

use crate::auth::scram::{self, Key, ScramError, MAX_ITERATIONS};

/// One permit per CPU.
fn permits() -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Arc::new(Semaphore::new(cpus))
    })
}

/// `Hi(password, salt, iterations)`, computed off the async workers.
pub async fn salted_password(
    password: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Result<Key, ScramError> {
    if iterations > MAX_ITERATIONS {
        return Err(ScramError::TooManyIterations { asked: iterations });
    }
    // The semaphore is never closed; were it, deriving anyway is right.
    let _permit = permits().clone().acquire_owned().await.ok();
    let (password, salt) = (password.to_vec(), salt.to_vec());
    let derived = tokio::task::spawn_blocking(move || {
        let key = scram::salted_password(&password, &salt, iterations);
        // The copy of the password does not outlive its use.
        let mut password = password;
        password.iter_mut().for_each(|b| *b = 0);
        key
    })
    .await;
    derived.map_err(|_| ScramError::Malformed("the key derivation did not complete"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn same_key_as_the_pure_function() {
        assert_eq!(
            salted_password(b"pw", b"salt", 64).await.unwrap(),
            scram::salted_password(b"pw", b"salt", 64)
        );
        assert_eq!(
            salted_password(b"pw", b"salt", MAX_ITERATIONS + 1)
                .await
                .unwrap_err(),
            ScramError::TooManyIterations {
                asked: MAX_ITERATIONS + 1
            }
        );
    }

    /// While a derivation with a huge iteration count runs, another task
    /// on the same (single-threaded) runtime keeps ticking.
    #[tokio::test(flavor = "current_thread")]
    async fn a_long_derivation_does_not_stall_other_tasks() {
        let started = Instant::now();
        let derivation = tokio::spawn(salted_password(b"pw", b"salt", 300_000));
        let mut longest_gap = Duration::ZERO;
        let mut last = Instant::now();
        while !derivation.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            longest_gap = longest_gap.max(last.elapsed());
            last = Instant::now();
        }
        let took = started.elapsed();
        derivation.await.unwrap().unwrap();
        assert!(took > Duration::from_millis(50), "took {took:?}");
        assert!(
            longest_gap < took / 4,
            "the ticker stalled for {longest_gap:?} of {took:?}"
        );
    }
}
