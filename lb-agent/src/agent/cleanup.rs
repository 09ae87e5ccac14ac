//! `lb-agent cleanup`: removes everything ballast installed on the node.

use std::path::Path;

use aya::programs::links::PinnedLink;

use crate::node::instance_lock;
use crate::{dataplane::loader::links_dir, net::netlink::Netlink};

/// Why cleaning up failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// An agent is running; it would put everything back.
    #[error("an lb-agent is running on this node: stop it first")]
    AgentRunning,
    /// Netlink failed.
    #[error(transparent)]
    Net(#[from] crate::net::netlink::NetError),
    /// A file could not be removed.
    #[error("cannot remove {0}: {1}")]
    Remove(String, std::io::Error),
}

/// Detaches the programs (pinned links), removes the pinned maps and every address
/// carrying ballast's marker. Returns one line per thing removed.
pub async fn cleanup(pin_dir: &Path) -> Result<Vec<String>, CleanupError> {
    let _lock = instance_lock().map_err(|_| CleanupError::AgentRunning)?;
    let mut done = Vec::new();
    let links = links_dir(pin_dir);
    if let Ok(entries) = std::fs::read_dir(&links) {
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            match PinnedLink::from_pin(&path).map(PinnedLink::unpin) {
                // Dropping the last reference destroys the link and detaches the program.
                Ok(Ok(fd)) => drop(fd),
                _ => {
                    std::fs::remove_file(&path).map_err(|err| CleanupError::Remove(path.display().to_string(), err))?
                }
            }
            let (kind, iface) = name.split_once('-').unwrap_or(("link", name.as_str()));
            done.push(format!("detached {} from {iface} (link {})", kind.to_uppercase(), path.display()));
        }
        std::fs::remove_dir(&links).map_err(|e| CleanupError::Remove(links.display().to_string(), e))?;
    }
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for e in entries.flatten() {
            let path = e.path();
            std::fs::remove_file(&path).map_err(|err| CleanupError::Remove(path.display().to_string(), err))?;
            done.push(format!("removed pinned map {}", path.display()));
        }
        std::fs::remove_dir(pin_dir).map_err(|e| CleanupError::Remove(pin_dir.display().to_string(), e))?;
    }
    let nl = Netlink::connect()?;
    let links = nl.links().await?;
    for a in nl.addresses().await?.into_iter().filter(|a| a.ours) {
        nl.del_address(a.index, a.addr, a.prefix).await?;
        let iface = links.iter().find(|l| l.index == a.index).map_or("?", |l| l.name.as_str());
        done.push(format!("removed address {}/{} from {iface}", a.addr, a.prefix));
    }
    Ok(done)
}
