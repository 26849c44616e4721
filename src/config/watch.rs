//! Watches the config file (and TLS files) for changes. The directory is watched, not the
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
    watch_files(&[file.to_owned()])
}

/// One watch over several files (a listener's certificate, key, CAs, CRLs).
pub fn watch_files(files: &[PathBuf]) -> notify::Result<ConfigWatch> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut names = Vec::new();
    for file in files {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
        let dir = file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
        names.extend(file.file_name().map(|n| n.to_owned()));
    }
    // Capacity 1: a pending notification already means "reload soon".
    let (tx, changes) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let relevant = event.paths.iter().any(|p| {
            p.file_name().is_some_and(|n| {
                names.iter().any(|name| name == n) || n.to_string_lossy().starts_with("..")
            })
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
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
