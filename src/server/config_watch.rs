//! `[reload] watch = true`: reload when a file changes, without a signal.
//! Kubernetes updates a mounted Secret by swapping a symlinked directory,
//! cert-manager and certbot by replacing files; polling each file's
//! metadata (through symlinks) sees all of these, with no platform
//! notification API. A change is acted on once every file has been still
//! for the debounce period, so a certificate and its key replaced one
//! after the other are reloaded together.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::server::ReloadHandle;

/// How often files are looked at.
const POLL: Duration = Duration::from_millis(500);

/// What is compared between two looks at a file: None when it is missing.
type Fingerprint = Option<(SystemTime, u64, u64)>;

fn fingerprint(path: &PathBuf) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The files to watch: the configuration file (if any) and every file it
/// names.
fn files(config_path: Option<&PathBuf>, config: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = config_path.into_iter().cloned().collect();
    files.extend(config.referenced_files());
    files.sort();
    files.dedup();
    files
}

/// Watches until the process ends.
pub async fn watch(
    handle: ReloadHandle,
    config_path: Option<PathBuf>,
    initial: Config,
    debounce: Duration,
) {
    let mut watched = files(config_path.as_ref(), &initial);
    let look = |files: &[PathBuf]| -> Vec<Fingerprint> { files.iter().map(fingerprint).collect() };
    let mut seen = look(&watched);
    tracing::info!(
        files = watched.len(),
        "watching configuration files for changes"
    );
    loop {
        tokio::time::sleep(POLL).await;
        let now = look(&watched);
        if now == seen {
            continue;
        }
        // Changed: wait until nothing has changed for `debounce`.
        let mut last = now;
        loop {
            tokio::time::sleep(debounce).await;
            let again = look(&watched);
            if again == last {
                break;
            }
            last = again;
        }
        tracing::info!("a configuration file changed; reloading");
        if handle.reload_all().is_ok() {
            // The new configuration may name other files.
            if let Some(Ok(config)) = config_path.as_ref().map(|p| Config::from_file(p)) {
                watched = files(config_path.as_ref(), &config);
            }
        }
        seen = look(&watched);
    }
}
