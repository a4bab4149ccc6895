//! Ranks on CPUs over TCP: every pair of ranks holds one connection (made by
//! [`super::rendezvous`]), each read by a thread of its own into a queue, so a rank's sends never
//! wait on what its peer is doing and a dead peer is seen as a closed connection at once.
//!
//! Collectives exchange whole buffers with every peer and combine them in rank order, so every
//! rank computes the same bits (an all-reduce is an all-gather followed by the same ordered sum
//! on every rank). That is O(size²) traffic: meant for tests and small CPU jobs, where it is
//! simple and exact; GPUs use NCCL. Every message carries its group, its collective and its
//! sequence number, so ranks that run different programs fail with a sentence instead of mixing
//! buffers.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::comm::{CommError, Communicator, ReduceOp};
use super::watchdog::{self, Health};
use super::ProcessGroup;

const MAGIC: u32 = 0x7472_6e31; // "trn1"
const HEADER: usize = 4 + 1 + 8 + 8 + 8;

/// Which collective a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    AllReduce = 1,
    AllGather,
    ReduceScatter,
    AllToAll,
    Counts,
    Broadcast,
    Barrier,
    /// "Alive" ([`super::watchdog`]); read by the connection's reader, never queued.
    Heartbeat,
    /// "Finished: my connection closing is no failure"; likewise.
    Goodbye,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        [Op::AllReduce, Op::AllGather, Op::ReduceScatter, Op::AllToAll, Op::Counts, Op::Broadcast, Op::Barrier, Op::Heartbeat, Op::Goodbye]
            .into_iter()
            .find(|op| *op as u8 == v)
    }
}

#[derive(Debug)]
struct Frame {
    op: u8,
    group: u64,
    seq: u64,
    payload: Vec<u8>,
}

/// The world's connections: `streams[r]` and `inbox[r]` for every peer `r` (none for this rank).
#[derive(Debug)]
pub(crate) struct Links {
    rank: usize,
    world: usize,
    streams: Vec<Option<Mutex<TcpStream>>>,
    inbox: Vec<Option<Mutex<Receiver<Result<Frame, CommError>>>>>,
    timeout: Duration,
    health: Arc<Health>,
}

impl Links {
    /// Takes over the connection to every peer (`streams[rank]` is `None`) and starts its reader.
    pub(crate) fn new(rank: usize, streams: Vec<Option<TcpStream>>, timeout: Duration) -> Result<Links, CommError> {
        let world = streams.len();
        let mut inbox = Vec::with_capacity(world);
        let mut writers = Vec::with_capacity(world);
        let health = Arc::new(Health::new(world));
        for (peer, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else {
                inbox.push(None);
                writers.push(None);
                continue;
            };
            let io = |e: std::io::Error| CommError::Io { rank: Some(peer), message: e.to_string() };
            stream.set_nodelay(true).map_err(io)?;
            stream.set_read_timeout(None).map_err(io)?;
            let reader = stream.try_clone().map_err(io)?;
            let (tx, rx) = mpsc::channel();
            let h = health.clone();
            std::thread::Builder::new()
                .name(format!("trainer-recv-{peer}"))
                .spawn(move || read_frames(reader, peer, tx, &h))
                .map_err(io)?;
            inbox.push(Some(Mutex::new(rx)));
            writers.push(Some(Mutex::new(stream)));
        }
        Ok(Links { rank, world, streams: writers, inbox, timeout, health })
    }

    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// Every other world rank.
    pub(crate) fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.world).filter(|&r| r != self.rank)
    }

    /// "Alive" to every peer whose connection is free now (a send in progress says as much,
    /// and a heartbeat must never wait behind a peer that stopped reading).
    pub(crate) fn heartbeat(&self) {
        for peer in self.peers() {
            let stream = self.streams[peer].as_ref().expect("a peer, not this rank");
            if let Ok(mut s) = stream.try_lock() {
                let _ = s.write_all(&frame(Op::Heartbeat, 0, 0, &[]));
            }
        }
    }

    /// "Finished" to every peer: from now on this rank leaving, or its peers, is no failure.
    fn goodbye(&self) {
        self.health.finish();
        for peer in self.peers() {
            let _ = self.send(peer, Op::Goodbye, 0, 0, &[]);
        }
    }

    fn send(&self, peer: usize, op: Op, group: u64, seq: u64, payload: &[u8]) -> Result<(), CommError> {
        let stream = self.streams[peer].as_ref().expect("a peer, not this rank");
        let mut s = stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(&frame(op, group, seq, payload)).map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => CommError::PeerClosed { rank: peer },
            _ => CommError::Io { rank: Some(peer), message: e.to_string() },
        })
    }

    fn recv(&self, peer: usize, op: Op, group: u64, seq: u64) -> Result<Vec<u8>, CommError> {
        let inbox = self.inbox[peer].as_ref().expect("a peer, not this rank");
        let rx = inbox.lock().unwrap_or_else(|p| p.into_inner());
        let frame = match rx.recv_timeout(self.timeout) {
            Ok(frame) => frame?,
            Err(RecvTimeoutError::Timeout) => {
                return Err(CommError::Timeout { rank: peer, seconds: self.timeout.as_secs(), waiting_for: format!("{op:?} #{seq}") })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(CommError::PeerClosed { rank: peer }),
        };
        if frame.op != op as u8 || frame.group != group || frame.seq != seq {
            let got = Op::from_u8(frame.op).map_or_else(|| format!("message kind {}", frame.op), |o| format!("{o:?}"));
            return Err(CommError::OutOfStep {
                rank: peer,
                expected: format!("{op:?} #{seq} of group {group:x}"),
                got: format!("{got} #{} of group {:x}", frame.seq, frame.group),
            });
        }
        Ok(frame.payload)
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        // Ends the readers (and tells the peers this rank is gone).
        for s in self.streams.iter().flatten() {
            let _ = s.lock().unwrap_or_else(|p| p.into_inner()).shutdown(Shutdown::Both);
        }
    }
}

/// One message: magic, op, group, sequence number, payload length, payload.
fn frame(op: Op, group: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + payload.len());
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.push(op as u8);
    bytes.extend_from_slice(&group.to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn read_frames(mut stream: TcpStream, peer: usize, tx: mpsc::Sender<Result<Frame, CommError>>, health: &Health) {
    loop {
        let mut header = [0u8; HEADER];
        if let Err(e) = stream.read_exact(&mut header) {
            health.closed(peer);
            let closed = matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted);
            let err = if closed { CommError::PeerClosed { rank: peer } } else { CommError::Io { rank: Some(peer), message: e.to_string() } };
            let _ = tx.send(Err(err));
            return;
        }
        let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
        if u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) != MAGIC {
            let _ = tx.send(Err(CommError::Io { rank: Some(peer), message: "a message that is not trainer's (another program on this port?)".into() }));
            return;
        }
        let (op, group, seq, len) = (header[4], u64_at(5), u64_at(13), u64_at(21) as usize);
        let mut payload = vec![0u8; len];
        if let Err(e) = stream.read_exact(&mut payload) {
            health.closed(peer);
            let _ = tx.send(Err(CommError::Io { rank: Some(peer), message: format!("a message cut short: {e}") }));
            return;
        }
        health.heard(peer);
        if op == Op::Heartbeat as u8 {
            continue;
        }
        if op == Op::Goodbye as u8 {
            health.said_goodbye(peer);
            continue;
        }
        if tx.send(Ok(Frame { op, group, seq, payload })).is_err() {
            return;
        }
    }
}

/// A process group's communicator over the world's TCP connections: the world itself
/// ([`super::rendezvous::connect`]) or a subgroup of it ([`split`](Self::split)).
#[derive(Debug)]
pub struct TcpCommunicator {
    links: Arc<Links>,
    /// The world ranks of this group, in group-rank order.
    members: Vec<usize>,
    /// This rank's index in `members`.
    index: usize,
    /// The same on every member: a hash of `members`.
    id: u64,
    seq: AtomicU64,
}

impl TcpCommunicator {
    pub(crate) fn world(links: Links) -> TcpCommunicator {
        let (rank, world) = (links.rank, links.world);
        let members: Vec<usize> = (0..world).collect();
        TcpCommunicator { id: group_id(&members), links: Arc::new(links), members, index: rank, seq: AtomicU64::new(0) }
    }

    /// The group of `members` (world ranks, in the order that gives their group ranks), which
    /// holds this rank; it shares the world's connections. Every member splits the same list
    /// with the same `tag` (the mesh axis): groups of the same ranks on two axes (the world and
    /// a tensor group of all of it, say) keep their messages apart by it.
    pub fn split(&self, tag: &str, members: &[usize]) -> Result<TcpCommunicator, CommError> {
        let me = self.links.rank;
        let index = members.iter().position(|&r| r == me).ok_or_else(|| CommError::Invalid(format!("rank {me} splits a group {members:?} it is not in")))?;
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != members.len() || sorted.last().is_some_and(|&r| r >= self.links.world) {
            return Err(CommError::Invalid(format!("group {members:?}: ranks must be distinct and below the world size {}", self.links.world)));
        }
        let id = tag.bytes().fold(group_id(members), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        Ok(TcpCommunicator { links: self.links.clone(), members: members.to_vec(), index, id, seq: AtomicU64::new(0) })
    }

    /// Watch this rank's peers (every rank of the world) from a thread of its own: `on_failure`
    /// gets a sentence naming the first that dies or hangs ([`watchdog`]).
    pub fn watch(&self, on_failure: impl FnOnce(String) + Send + 'static) {
        watchdog::watch(Arc::downgrade(&self.links), watchdog::SILENCE, on_failure);
    }

    /// Tell every peer this rank finished: its leaving is no failure, and it watches no more.
    /// Only where every rank stops together.
    pub fn goodbye(&self) {
        self.links.goodbye();
    }

    /// This rank's index in the world (not in this group).
    pub fn world_rank(&self) -> usize {
        self.links.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends `payload(j)` to every other member `j` and returns every member's message to this
    /// rank in group order (this rank's own `payload(index)` at its place).
    fn exchange(&self, op: Op, payload: impl Fn(usize) -> Vec<u8>) -> Result<Vec<Vec<u8>>, CommError> {
        let seq = self.next_seq();
        // Every send is tried even when one fails, so the live peers get this rank's part and
        // name the rank that is gone, not this one.
        let mut failed = None;
        for (j, &peer) in self.members.iter().enumerate() {
            if j != self.index {
                if let Err(e) = self.links.send(peer, op, self.id, seq, &payload(j)) {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let mut parts = Vec::with_capacity(self.size());
        for (j, &peer) in self.members.iter().enumerate() {
            parts.push(if j == self.index { payload(j) } else { self.links.recv(peer, op, self.id, seq)? });
        }
        Ok(parts)
    }

    /// Every member's `x` combined by `op` in group-rank order (the same bits on every rank).
    pub fn all_reduce_f32(&self, x: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        let bytes = f32_bytes(x);
        let parts = self.exchange(Op::AllReduce, |_| bytes.clone())?;
        combine(parts, x.len(), op, self)
    }

    /// The members' `x` end to end in group-rank order.
    pub fn all_gather_f32(&self, x: &[f32]) -> Result<Vec<f32>, CommError> {
        let bytes = f32_bytes(x);
        let parts = self.exchange(Op::AllGather, |_| bytes.clone())?;
        let mut out = Vec::with_capacity(x.len() * self.size());
        for (j, p) in parts.iter().enumerate() {
            let v = bytes_f32(p);
            if v.len() != x.len() {
                return Err(self.uneven(j, v.len(), x.len()));
            }
            out.extend(v);
        }
        Ok(out)
    }

    /// Block `index` of every member's `x` (`size` equal blocks) combined by `op` in rank order.
    pub fn reduce_scatter_f32(&self, x: &[f32], op: ReduceOp) -> Result<Vec<f32>, CommError> {
        let size = self.size();
        if x.len() % size != 0 {
            return Err(CommError::Invalid(format!("reduce-scatter of {} elements over {size} ranks: not a multiple", x.len())));
        }
        let n = x.len() / size;
        let parts = self.exchange(Op::ReduceScatter, |j| f32_bytes(&x[j * n..(j + 1) * n]))?;
        combine(parts, n, op, self)
    }

    /// `x`'s `send_counts[j]` elements for member `j` after one another, out; in, the elements
    /// each member sent this one, in group-rank order (`recv_counts[j]` from `j`).
    pub fn all_to_all_f32(&self, x: &[f32], send_counts: &[usize], recv_counts: &[usize]) -> Result<Vec<f32>, CommError> {
        let size = self.size();
        if send_counts.len() != size || recv_counts.len() != size || send_counts.iter().sum::<usize>() != x.len() {
            return Err(CommError::Invalid(format!(
                "all-to-all of {} elements with send counts {send_counts:?} and receive counts {recv_counts:?} over {size} ranks",
                x.len()
            )));
        }
        let starts: Vec<usize> = send_counts.iter().scan(0, |s, &c| Some(std::mem::replace(s, *s + c))).collect();
        let parts = self.exchange(Op::AllToAll, |j| f32_bytes(&x[starts[j]..starts[j] + send_counts[j]]))?;
        let mut out = Vec::with_capacity(recv_counts.iter().sum());
        for (j, p) in parts.iter().enumerate() {
            let v = bytes_f32(p);
            if v.len() != recv_counts[j] {
                return Err(self.uneven(j, v.len(), recv_counts[j]));
            }
            out.extend(v);
        }
        Ok(out)
    }

    /// See [`Communicator::all_to_all_counts`].
    pub fn all_to_all_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>, CommError> {
        self.all_to_all_count_blocks(send_counts, 1)
    }

    /// See [`Communicator::all_to_all_count_blocks`]: one message per peer.
    pub fn all_to_all_count_blocks(&self, send: &[usize], per_rank: usize) -> Result<Vec<usize>, CommError> {
        if send.len() != self.size() * per_rank {
            return Err(CommError::Invalid(format!("{} send counts for {} ranks of {per_rank} each", send.len(), self.size())));
        }
        let parts = self.exchange(Op::Counts, |j| send[j * per_rank..(j + 1) * per_rank].iter().flat_map(|&c| (c as u64).to_le_bytes()).collect())?;
        let mut out = Vec::with_capacity(send.len());
        for (j, p) in parts.iter().enumerate() {
            if p.len() != 8 * per_rank {
                return Err(self.uneven(j, p.len(), 8 * per_rank));
            }
            out.extend(p.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize));
        }
        Ok(out)
    }

    /// Member `root`'s `bytes` on every member (the others pass anything, `&[]` say): how the
    /// launcher hands out NCCL's unique id.
    pub fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>, CommError> {
        if root >= self.size() {
            return Err(CommError::Invalid(format!("broadcast from rank {root} in a group of {}", self.size())));
        }
        let seq = self.next_seq();
        if self.index == root {
            for (j, &peer) in self.members.iter().enumerate() {
                if j != root {
                    self.links.send(peer, Op::Broadcast, self.id, seq, bytes)?;
                }
            }
            Ok(bytes.to_vec())
        } else {
            self.links.recv(self.members[root], Op::Broadcast, self.id, seq)
        }
    }

    /// Returns when every member has called it.
    pub fn barrier_host(&self) -> Result<(), CommError> {
        self.exchange(Op::Barrier, |_| Vec::new()).map(drop)
    }

    fn uneven(&self, j: usize, got: usize, expected: usize) -> CommError {
        CommError::OutOfStep { rank: self.members[j], expected: format!("a message of {expected}"), got: format!("{got}") }
    }
}

fn combine(parts: Vec<Vec<u8>>, n: usize, op: ReduceOp, comm: &TcpCommunicator) -> Result<Vec<f32>, CommError> {
    let mut acc: Option<Vec<f32>> = None;
    for (j, p) in parts.iter().enumerate() {
        let v = bytes_f32(p);
        if v.len() != n {
            return Err(comm.uneven(j, v.len(), n));
        }
        match &mut acc {
            None => acc = Some(v),
            Some(a) => op.apply(a, &v),
        }
    }
    Ok(acc.unwrap_or_default())
}

fn group_id(members: &[usize]) -> u64 {
    // FNV-1a: the same on every rank and every build.
    members.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| (h ^ r as u64).wrapping_mul(0x100_0000_01b3))
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

/// A flat tensor's values on the host in f32 (exact for bf16 / f16), its dtype and device.
fn to_host<B: Backend>(x: Tensor<B, 1>) -> Result<(Vec<f32>, DType, B::Device), CommError> {
    let (dtype, device) = (x.dtype(), x.device());
    let values = x.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| CommError::Invalid(format!("reading a tensor: {e:?}")))?;
    Ok((values, dtype, device))
}

fn from_host<B: Backend>(values: Vec<f32>, dtype: DType, device: &B::Device) -> Tensor<B, 1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]).convert_dtype(dtype), device)
}

/// The collectives of the trait on the host: any backend's tensors travel through f32.
impl<B: Backend> Communicator<B> for TcpCommunicator {
    fn group(&self) -> ProcessGroup {
        ProcessGroup::new(self.index, self.size())
    }

    fn all_reduce(&self, x: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>, CommError> {
        let (v, dtype, device) = to_host(x)?;
        Ok(from_host(self.all_reduce_f32(&v, op)?, dtype, &device))
    }

    fn all_gather(&self, x: Tensor<B, 1>) -> Result<Tensor<B, 1>, CommError> {
        let (v, dtype, device) = to_host(x)?;
        Ok(from_host(self.all_gather_f32(&v)?, dtype, &device))
    }

    fn reduce_scatter(&self, x: Tensor<B, 1>, op: ReduceOp) -> Result<Tensor<B, 1>, CommError> {
        let (v, dtype, device) = to_host(x)?;
        Ok(from_host(self.reduce_scatter_f32(&v, op)?, dtype, &device))
    }

    fn all_to_all(&self, x: Tensor<B, 1>, send_counts: &[usize], recv_counts: &[usize]) -> Result<Tensor<B, 1>, CommError> {
        let (v, dtype, device) = to_host(x)?;
        Ok(from_host(self.all_to_all_f32(&v, send_counts, recv_counts)?, dtype, &device))
    }

    fn all_to_all_counts(&self, send_counts: &[usize]) -> Result<Vec<usize>, CommError> {
        TcpCommunicator::all_to_all_counts(self, send_counts)
    }

    fn all_to_all_count_blocks(&self, send: &[usize], per_rank: usize) -> Result<Vec<usize>, CommError> {
        TcpCommunicator::all_to_all_count_blocks(self, send, per_rank)
    }

    fn broadcast(&self, x: Tensor<B, 1>, root: usize) -> Result<Tensor<B, 1>, CommError> {
        let (v, dtype, device) = to_host(x)?;
        let n = v.len();
        let out = bytes_f32(&self.broadcast_bytes(&f32_bytes(&v), root)?);
        if out.len() != n {
            return Err(self.uneven(root, out.len(), n));
        }
        Ok(from_host(out, dtype, &device))
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.barrier_host()
    }
}
