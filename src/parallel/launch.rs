//! Starting a job's ranks, as torchrun does: `trainer run RECIPE --nproc-per-node N` runs this
//! binary N times on this machine with the variables torchrun and Megatron read (`WORLD_SIZE`,
//! `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); a rank started by another launcher
//! (torchrun itself, a cluster's scheduler) reads the same variables. Rank 0 serves the
//! rendezvous; every rank checks that its recipe and binary match rank 0's.
//!
//! Rank 0 keeps the terminal; rank `k > 0` writes `rank-k.log` in the launcher's log folder.
//! When a rank fails, the launcher stops the others and names the rank and its log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::comm::CommError;
use super::rendezvous::{self, RendezvousConfig};
use super::tcp::TcpCommunicator;
use crate::error::{Error, Result};

/// How long a rank waits for the rendezvous, and for a peer's part of a collective.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(50);

/// This process's place in a job, from the launcher's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankEnv {
    /// The job this process belongs to; `None` when no launcher started it (no `WORLD_SIZE`, or
    /// a world of 1 without a master to meet at: a stray `WORLD_SIZE=1` is no job).
    pub fn from_env() -> Result<Option<RankEnv>> {
        RankEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// [`from_env`](Self::from_env) over any source of variables (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let Some(world) = var("WORLD_SIZE") else { return Ok(None) };
        let number = |key: &str, text: &str| -> Result<usize> {
            text.trim().parse().map_err(|_| Error::Parallel(format!("{key}={text:?} is not a whole number")))
        };
        let world = number("WORLD_SIZE", &world)?;
        if world == 0 || (world == 1 && (var("MASTER_ADDR").is_none() || var("MASTER_PORT").is_none())) {
            return Ok(None);
        }
        let need = |key: &str| var(key).ok_or_else(|| Error::Parallel(format!("WORLD_SIZE is {world} but {key} is not set: a launcher sets RANK, MASTER_ADDR and MASTER_PORT beside it")));
        let rank = number("RANK", &need("RANK")?)?;
        if rank >= world {
            return Err(Error::Parallel(format!("RANK={rank} with WORLD_SIZE={world}: expected 0 to {}", world - 1)));
        }
        let port = need("MASTER_PORT")?;
        let master_port = port.trim().parse().map_err(|_| Error::Parallel(format!("MASTER_PORT={port:?}: expected a port number, 1 to 65535")))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", &v)?,
            None => rank,
        };
        Ok(Some(RankEnv { rank, world, local_rank, master_addr: need("MASTER_ADDR")?, master_port }))
    }

    /// Join the job's rendezvous (rank 0 serves it) with a recipe fingerprint: the world's
    /// communicator.
    pub fn connect(&self, fingerprint: &str) -> std::result::Result<TcpCommunicator, CommError> {
        let cfg = RendezvousConfig {
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
            rank: self.rank,
            world: self.world,
            fingerprint: fingerprint.to_string(),
            timeout: RENDEZVOUS_TIMEOUT,
            collective_timeout: COLLECTIVE_TIMEOUT,
        };
        if self.rank == 0 {
            let addr = format!("{}:{}", self.master_addr, self.master_port);
            let listener = std::net::TcpListener::bind(&addr).map_err(|e| CommError::Bind { addr, message: e.to_string() })?;
            rendezvous::serve(listener, &cfg)
        } else {
            rendezvous::connect(&cfg)
        }
    }
}

/// What every rank must agree on: the recipe as it resolved (overrides included) and this
/// binary's version.
pub fn fingerprint(recipe_toml: &str) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update([0]);
    h.update(recipe_toml.as_bytes());
    h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The nodes of a job as torchrun's flags name them: how many, this one's place, and where node
/// 0's rendezvous listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nodes {
    pub count: usize,
    pub rank: usize,
    pub master_addr: String,
    /// `None`: a free port (one node only).
    pub master_port: Option<u16>,
}

/// Run this binary with `args` as `nproc` ranks on this machine (node `nodes.rank` of
/// `nodes.count`: world ranks `nodes.rank * nproc ..`) and wait for them: `Ok` when every rank
/// exits 0; else the first rank that failed, by name, with its log, after the others are
/// stopped.
pub fn launch(nproc: usize, nodes: &Nodes, args: &[String], log_dir: &Path) -> Result<()> {
    if nproc == 0 {
        return Err(Error::Parallel("--nproc-per-node 0: expected 1 or more".into()));
    }
    if nodes.count == 0 || nodes.rank >= nodes.count {
        return Err(Error::Parallel(format!("--node-rank {} of --nnodes {}: expected a node rank from 0 to {}", nodes.rank, nodes.count, nodes.count.saturating_sub(1))));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("cannot find this binary to start its ranks: {e}")))?;
    let port = match (nodes.master_port, nodes.count) {
        (Some(p), _) => p,
        (None, 1) => free_port()?,
        (None, n) => {
            return Err(Error::Parallel(format!(
                "--nnodes {n} needs --master-port: every node must name the port node 0 serves the rendezvous on"
            )))
        }
    };
    let world = nproc * nodes.count;
    std::fs::create_dir_all(log_dir).map_err(|e| Error::file(log_dir, format!("cannot create the ranks' log folder: {e}")))?;
    let mut children: Vec<(usize, Child, Option<PathBuf>)> = Vec::with_capacity(nproc);
    for local in 0..nproc {
        let rank = nodes.rank * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("WORLD_SIZE", world.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &nodes.master_addr)
            .env("MASTER_PORT", port.to_string());
        let log = (rank > 0).then(|| log_dir.join(format!("rank-{rank}.log")));
        if let Some(path) = &log {
            let file = std::fs::File::create(path).map_err(|e| Error::file(path, format!("cannot create: {e}")))?;
            let err = file.try_clone().map_err(|e| Error::file(path, format!("cannot open twice: {e}")))?;
            cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, child, log)),
            Err(e) => {
                stop(&mut children);
                return Err(Error::Parallel(format!("cannot start rank {rank}: {e}")));
            }
        }
    }
    let mut failed: Option<(usize, String, Option<PathBuf>)> = None;
    let mut running = nproc;
    let mut deadline: Option<Instant> = None;
    while running > 0 {
        for (rank, child, log) in children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                if !status.success() && failed.is_none() {
                    let how = status.code().map_or_else(|| "was killed by a signal".to_string(), |c| format!("exited with code {c}"));
                    failed = Some((*rank, how, log.clone()));
                    // The others notice the closed connections; give them a moment to say so.
                    deadline = Some(Instant::now() + Duration::from_secs(5));
                }
            }
        }
        running = children.iter_mut().filter_map(|(_, c, _)| matches!(c.try_wait(), Ok(None)).then_some(())).count();
        if deadline.is_some_and(|d| Instant::now() > d) {
            stop(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        None => Ok(()),
        Some((rank, how, log)) => Err(Error::Parallel(format!(
            "rank {rank} of {world} {how}; {}",
            log.map_or_else(|| "its messages are above".to_string(), |l| format!("its log is {}", l.display()))
        ))),
    }
}

fn stop(children: &mut [(usize, Child, Option<PathBuf>)]) {
    for (_, child, _) in children.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// A port on loopback no one listens on now (the OS's pick).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Parallel(format!("cannot find a free port on 127.0.0.1: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| Error::Parallel(format!("cannot find a free port: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_name_the_rank() {
        assert_eq!(RankEnv::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(RankEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(), None);
        // A launched job of one (`--nproc-per-node 1`): its rank meets itself at the master.
        let one = [("WORLD_SIZE", "1"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")];
        assert_eq!(RankEnv::from_vars(vars(&one)).unwrap().map(|e| e.world), Some(1));
        let env = [("WORLD_SIZE", "4"), ("RANK", "2"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];
        let got = RankEnv::from_vars(vars(&env)).unwrap().unwrap();
        assert_eq!(got, RankEnv { rank: 2, world: 4, local_rank: 2, master_addr: "node0".into(), master_port: 29500 });
        let with_local = [("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")];
        assert_eq!(RankEnv::from_vars(vars(&with_local)).unwrap().unwrap().local_rank, 1);
    }

    #[test]
    fn bad_variables_say_what_would_be_valid() {
        let e = |pairs: &[(&str, &str)]| RankEnv::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(e(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE=\"two\" is not a whole number"));
        assert!(e(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")]).contains("expected 0 to 1"));
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "99999")]).contains("expected a port number"));
    }

    #[test]
    fn fingerprints_differ_with_the_recipe() {
        assert_eq!(fingerprint("a = 1"), fingerprint("a = 1"));
        assert_ne!(fingerprint("a = 1"), fingerprint("a = 2"));
    }
}
