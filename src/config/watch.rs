//! Watches the config file for changes. The directory is watched, not the
//! file, because editors and Kubernetes ConfigMaps replace files (rename or
//! symlink swap) rather than write them in place.

use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the OS watch alive; dropping it stops the notifications.
pub struct ConfigWatch {
    _watcher: RecommendedWatcher,
    pub changes: mpsc::Receiver<()>,
}

pub fn watch(file: &Path) -> notify::Result<ConfigWatch> {
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    let dir = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = file.file_name().map(|n| n.to_owned());
    // Capacity 1: a pending notification already means "reload soon".
    let (tx, changes) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            let n = p.file_name();
            n == name.as_deref() || n.is_some_and(|n| n.to_string_lossy().starts_with(".."))
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(ConfigWatch {
        _watcher: watcher,
        changes,
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn sees_renames() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("g.yaml");
        std::fs::write(&file, "a").unwrap();
        let mut w = super::watch(&file).unwrap();
        std::fs::write(dir.path().join("g.tmp"), "b").unwrap();
        std::fs::rename(dir.path().join("g.tmp"), &file).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), w.changes.recv())
            .await
            .unwrap();
    }
}
