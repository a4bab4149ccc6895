//! How the ranks of a job find one another, as torchrun's static rendezvous does: rank 0
//! listens on the master address; every other rank connects to it, says who it is (rank, world
//! size, a fingerprint of its recipe and binary) and where it listens; rank 0 checks that all
//! agree and hands out the table of addresses; then every pair of ranks connects once. The
//! connection to rank 0 stays the pair's link, and the result is the world's
//! [`TcpCommunicator`] (NCCL's unique id later travels over it too).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::comm::CommError;
use super::tcp::{Links, TcpCommunicator};

/// One rank's view of the job it joins.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    /// Rank 0's host (`MASTER_ADDR`): a name or an address.
    pub master_addr: String,
    /// `MASTER_PORT`.
    pub master_port: u16,
    pub rank: usize,
    pub world: usize,
    /// What must be equal on every rank (the recipe's hash and trainer's version): a rank
    /// whose fingerprint differs from rank 0's is refused, and so is the job.
    pub fingerprint: String,
    /// How long to wait for the others to join.
    pub timeout: Duration,
    /// How long a collective waits for a peer's message before naming it as hung (a slow peer,
    /// a checkpoint being written, must fit in it: torch's default is 10 minutes).
    pub collective_timeout: Duration,
}

impl RendezvousConfig {
    fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

/// Joins the job: rank 0 listens on the master address, the others connect to it.
pub fn connect(config: &RendezvousConfig) -> Result<TcpCommunicator, CommError> {
    if config.rank == 0 {
        let addr = config.master();
        let listener = TcpListener::bind(&addr).map_err(|e| CommError::Bind { addr, message: e.to_string() })?;
        serve(listener, config)
    } else {
        join(config)
    }
}

/// Rank 0 on a listener it already holds (bound to the master port; tests bind port 0).
pub fn serve(listener: TcpListener, config: &RendezvousConfig) -> Result<TcpCommunicator, CommError> {
    check_config(config)?;
    let deadline = Instant::now() + config.timeout;
    let mut joined: Vec<Option<(TcpStream, SocketAddr)>> = (0..config.world).map(|_| None).collect();
    for _ in 1..config.world {
        let waiting = || (1..config.world).filter(|r| joined[*r].is_none()).map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        let Some(mut stream) = accept_until(&listener, deadline)? else {
            return Err(CommError::Mismatch(format!(
                "rank 0 waited {} s for ranks {} to join: were they started with the same MASTER_ADDR / MASTER_PORT and a world size of {}?",
                config.timeout.as_secs(),
                waiting(),
                config.world
            )));
        };
        let hello = read_message(&mut stream, deadline, None)?;
        let (rank, addr) = match check_hello(&hello, &stream, config, &joined) {
            Ok(v) => v,
            Err(reason) => {
                // Every rank that came learns why the job ends, not only the one refused.
                for mut s in std::iter::once(stream).chain(joined.into_iter().flatten().map(|(s, _)| s)) {
                    let _ = write_message(&mut s, &format!("refused {reason}"));
                }
                return Err(CommError::Mismatch(reason));
            }
        };
        joined[rank] = Some((stream, addr));
    }
    let table: Vec<String> = joined.iter().map(|j| j.as_ref().map_or_else(|| "-".to_string(), |(_, a)| a.to_string())).collect();
    let table = format!("ok {}", table.join(" "));
    let mut streams = vec![None];
    for (rank, j) in joined.into_iter().enumerate().skip(1) {
        let (mut stream, _) = j.expect("every rank joined");
        write_message(&mut stream, &table).map_err(|e| io(Some(rank), e))?;
        streams.push(Some(stream));
    }
    Ok(TcpCommunicator::world(Links::new(0, streams, config.collective_timeout)?))
}

/// A rank other than 0: registers with rank 0, then connects to the ranks below it and accepts
/// the ranks above it.
fn join(config: &RendezvousConfig) -> Result<TcpCommunicator, CommError> {
    check_config(config)?;
    let deadline = Instant::now() + config.timeout;
    let mut master = connect_until(&config.master(), deadline, config.timeout)?;
    let ip = master.local_addr().map_err(|e| io(Some(0), e))?.ip();
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| io(None, e))?;
    let port = listener.local_addr().map_err(|e| io(None, e))?.port();
    let hello = format!("hello {} {} {} {}", config.rank, config.world, port, config.fingerprint);
    write_message(&mut master, &hello).map_err(|e| io(Some(0), e))?;
    let reply = read_message(&mut master, deadline, Some(0))?;
    let table: Vec<&str> = match reply.split_once(' ') {
        Some(("ok", rest)) => rest.split(' ').collect(),
        Some(("refused", reason)) => return Err(CommError::Mismatch(format!("rank 0 refused rank {}: {reason}", config.rank))),
        _ => return Err(CommError::Io { rank: Some(0), message: format!("an answer that is not trainer's rendezvous: {reply:?}") }),
    };
    if table.len() != config.world {
        return Err(CommError::Io { rank: Some(0), message: format!("an address table of {} ranks for a world of {}", table.len(), config.world) });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..config.world).map(|_| None).collect();
    streams[0] = Some(master);
    for (peer, addr) in table.iter().enumerate().take(config.rank).skip(1) {
        let mut s = connect_until(addr, deadline, config.timeout)?;
        write_message(&mut s, &format!("peer {}", config.rank)).map_err(|e| io(Some(peer), e))?;
        streams[peer] = Some(s);
    }
    for _ in config.rank + 1..config.world {
        let Some(mut s) = accept_until(&listener, deadline)? else {
            let missing: Vec<usize> = (config.rank + 1..config.world).filter(|r| streams[*r].is_none()).collect();
            let names: Vec<String> = missing.iter().map(|r| r.to_string()).collect();
            return Err(CommError::Timeout { rank: missing[0], seconds: config.timeout.as_secs(), waiting_for: format!("ranks {} to connect", names.join(", ")) });
        };
        let msg = read_message(&mut s, deadline, None)?;
        let peer = msg
            .strip_prefix("peer ")
            .and_then(|r| r.parse::<usize>().ok())
            .filter(|r| *r > config.rank && *r < config.world && streams[*r].is_none())
            .ok_or_else(|| CommError::Io { rank: None, message: format!("an unexpected connection to rank {}'s port ({msg:?})", config.rank) })?;
        streams[peer] = Some(s);
    }
    Ok(TcpCommunicator::world(Links::new(config.rank, streams, config.collective_timeout)?))
}

fn check_config(config: &RendezvousConfig) -> Result<(), CommError> {
    if config.world == 0 || config.rank >= config.world {
        return Err(CommError::Mismatch(format!("rank {} outside a world of {} ranks (ranks are 0 to world size - 1)", config.rank, config.world)));
    }
    if config.fingerprint.contains(char::is_whitespace) || config.fingerprint.is_empty() {
        return Err(CommError::Invalid(format!("a fingerprint must be one word, not {:?}", config.fingerprint)));
    }
    Ok(())
}

/// `Ok((rank, its listening address))` for a valid `hello`, else the reason to refuse it.
fn check_hello(hello: &str, stream: &TcpStream, config: &RendezvousConfig, joined: &[Option<(TcpStream, SocketAddr)>]) -> Result<(usize, SocketAddr), String> {
    let fields: Vec<&str> = hello.split(' ').collect();
    let [tag, rank, world, port, fingerprint] = fields[..] else {
        return Err(format!("a connection to the master port that is not a trainer rank ({hello:?})"));
    };
    let (Ok(rank), Ok(world), Ok(port)) = (rank.parse::<usize>(), world.parse::<usize>(), port.parse::<u16>()) else {
        return Err(format!("a malformed greeting {hello:?}"));
    };
    if tag != "hello" {
        return Err(format!("a malformed greeting {hello:?}"));
    }
    if world != config.world {
        return Err(format!("rank {rank} was started for a world of {world} ranks, rank 0 for {}: give every rank the same world size", config.world));
    }
    if rank == 0 || rank >= world {
        return Err(format!("a second process claims rank {rank}, or a rank outside 1..{world}"));
    }
    if joined[rank].is_some() {
        return Err(format!("two processes claim rank {rank}: give each its own RANK / --node-rank"));
    }
    if fingerprint != config.fingerprint {
        return Err(format!("rank {rank}'s recipe or trainer binary differs from rank 0's (fingerprint {fingerprint} against {}): start every rank from the same recipe and build", config.fingerprint));
    }
    let ip = stream.peer_addr().map_err(|e| e.to_string())?.ip();
    Ok((rank, SocketAddr::new(ip, port)))
}

fn io(rank: Option<usize>, e: std::io::Error) -> CommError {
    CommError::Io { rank, message: e.to_string() }
}

/// The next connection, or `None` once `deadline` passes.
fn accept_until(listener: &TcpListener, deadline: Instant) -> Result<Option<TcpStream>, CommError> {
    listener.set_nonblocking(true).map_err(|e| io(None, e))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| io(None, e))?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(None, e)),
        }
    }
}

/// Connects to `addr`, retrying until `deadline` (the other side may start later).
fn connect_until(addr: &str, deadline: Instant, timeout: Duration) -> Result<TcpStream, CommError> {
    let unreachable = || CommError::Unreachable { addr: addr.to_string(), seconds: timeout.as_secs() };
    loop {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
            if let Ok(s) = TcpStream::connect_timeout(a, left.min(Duration::from_secs(5))) {
                return Ok(s);
            }
        }
        if Instant::now() >= deadline {
            return Err(unreachable());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rendezvous messages: a u32 length and UTF-8 text.
fn write_message(stream: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let mut buf = (text.len() as u32).to_le_bytes().to_vec();
    buf.extend_from_slice(text.as_bytes());
    stream.write_all(&buf)
}

const MAX_MESSAGE: usize = 1 << 20;

fn read_message(stream: &mut TcpStream, deadline: Instant, peer: Option<usize>) -> Result<String, CommError> {
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
    stream.set_read_timeout(Some(left)).map_err(|e| io(peer, e))?;
    let fail = |e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => match peer {
            Some(rank) => CommError::Timeout { rank, seconds: left.as_secs(), waiting_for: "the rendezvous".into() },
            None => CommError::Io { rank: None, message: format!("a process connected but sent no greeting within {} s", left.as_secs()) },
        },
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => match peer {
            Some(rank) => CommError::PeerClosed { rank },
            None => CommError::Io { rank: None, message: "a connection closed during the rendezvous".into() },
        },
        _ => io(peer, e),
    };
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(fail)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(CommError::Io { rank: peer, message: format!("a rendezvous message of {len} bytes: not a trainer rank") });
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).map_err(fail)?;
    String::from_utf8(buf).map_err(|_| CommError::Io { rank: peer, message: "a rendezvous message that is not text".into() })
}
