//! NCCL collectives: one process per GPU (feature `nccl`).
//!
//! [`NcclComm`] implements [`Collective`] with cudarc's NCCL bindings as
//! candle 0.11.1 re-exports them (`candle_core::cuda_backend::cudarc::nccl`,
//! NCCL 2.30 API). Every collective is enqueued on **candle's CUDA stream** for
//! the device (`CudaDevice::cuda_stream()`), so it is ordered after the kernels
//! that produced its input and before those that consume its output, with no
//! host synchronisation. Each op is a candle `CustomOp1` whose CUDA forward
//! allocates the output on that stream and calls NCCL; a CPU tensor is an
//! error.
//!
//! # Setting up the communicator
//!
//! NCCL needs one unique id ([`NcclId`], 128 bytes) shared by all ranks. The
//! process that creates it (`ncclGetUniqueId`) hosts NCCL's bootstrap root, so
//! it must stay alive until every rank has initialised. Two ways:
//!
//! - **environment variable**: a launcher process calls [`NcclId::new`], starts
//!   `N` processes with `STEEPEST_NCCL_ID=<id.to_hex()>`, `RANK=r`,
//!   `WORLD_SIZE=N` (and optionally `LOCAL_RANK`, the GPU ordinal; default
//!   `RANK`), and waits for them;
//! - **file**: every process gets `STEEPEST_NCCL_ID_FILE=<path>`, `RANK`,
//!   `WORLD_SIZE`; rank 0 creates the id and writes it to the file atomically
//!   (write to `<path>.tmp`, rename), the other ranks poll for the file (every
//!   50 ms, up to `STEEPEST_NCCL_TIMEOUT_S` seconds, default 300). Use a path
//!   that is new for each run (e.g. with the job id in it): a stale file from
//!   an earlier run would be read by the other ranks.
//!
//! [`NcclComm::from_env`] does either (the variable wins when both are set);
//! [`NcclComm::new`] takes the rank, world size and id explicitly.
//!
//! ```no_run
//! # #[cfg(feature = "nccl")] {
//! use steepest::distributed::{Collective, LaunchEnv, NcclComm};
//! let env = LaunchEnv::from_env()?;                 // RANK, WORLD_SIZE, LOCAL_RANK
//! let device = candle_core::Device::new_cuda(env.local_rank)?;
//! let comm = NcclComm::from_env(&device)?;          // STEEPEST_NCCL_ID or STEEPEST_NCCL_ID_FILE
//! assert_eq!(comm.world_size(), env.world_size);
//! # }
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! # Semantics and limits
//!
//! - dtypes f32 and bf16. NCCL reduces bf16 **in bf16 between steps**: each
//!   ring step adds in f32 inside the kernel and rounds the partial sum to bf16
//!   before sending it on, so a bf16 sum over `N` ranks is rounded up to `N − 1`
//!   times (the in-process ranks round once); f32 accumulation end to end would
//!   need an f32 buffer, i.e. f32 communication. [`ReduceOp::Avg`] is NCCL's
//!   `ncclAvg`. The reduction order is NCCL's (ring or tree, chosen by NCCL):
//!   reproducible for a fixed topology and `NCCL_ALGO`/`NCCL_PROTO`, not
//!   equal to the in-process ranks' rank-order sum.
//! - NCCL cannot see the other ranks' arguments: different element counts or
//!   dtypes across ranks hang or corrupt memory instead of failing. Only local
//!   errors are reported (dtype, a CPU tensor or another GPU, an element count
//!   not divisible by the world size, a root out of range). [`DataParallel`]
//!   checks once, at construction, that all ranks agree on the layout.
//! - One GPU per rank: NCCL refuses two ranks on one GPU. `NcclComm` is not
//!   `Send` (it owns a raw `ncclComm_t`): create it on the thread that uses it.
//!   Dropping it calls `ncclCommAbort`.
//! - [`barrier`](Collective::barrier) is an all-reduce of one element followed
//!   by a synchronisation of the stream.
//!
//! # Building
//!
//! No GPU is needed to build, and none was available where this was written:
//! **nothing in this file has been run**, only compiled and linked. The CUDA 13.0
//! toolchain and NCCL come from PyPI wheels:
//!
//! ```text
//! bash ../shared/cuda/install-toolkit.sh && source /opt/cuda-13.0/env.sh
//! bash scripts/install-nccl.sh && source /opt/nccl-2.30/env.sh   # nvidia-nccl-cu13==2.30.7
//! CARGO_TARGET_DIR=target-cuda cargo build --features nccl --lib
//! CARGO_TARGET_DIR=target-cuda cargo test --features nccl --test distributed_nccl --no-run
//! ```
//!
//! `scripts/install-nccl.sh` installs the wheel under `/opt/nccl-2.30` (or
//! `$NCCL_PREFIX`), adds the link-time name `libnccl.so`, and writes an
//! `env.sh` that puts its `lib/` on `LIBRARY_PATH` (cudarc links `-lnccl`
//! dynamically) and `LD_LIBRARY_PATH` (to run). On a GPU host, any
//! `libnccl.so.2` of version ≥ 2.30 in the loader path works (PyTorch's wheels
//! ship one).
//!
//! [`DataParallel`]: super::DataParallel

use super::collective::{check_dtype, Collective, ReduceOp};
use super::dist_err;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::cudarc::nccl::{self, Comm, Id, NcclType};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use std::path::Path;
use std::time::{Duration, Instant};

/// The unique id that all ranks of one NCCL communicator share (128 bytes).
#[derive(Clone, Copy)]
pub struct NcclId(Id);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({}…)", &self.to_hex()[..16])
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). The calling process hosts NCCL's
    /// bootstrap root: keep it alive until every rank has initialised.
    pub fn new() -> Result<Self> {
        Id::new()
            .map(NcclId)
            .map_err(|e| dist_err("NcclId::new", format!("ncclGetUniqueId failed: {e:?}")))
    }

    /// The id as 256 lowercase hex digits (for an environment variable).
    pub fn to_hex(&self) -> String {
        self.0
            .internal()
            .iter()
            .map(|b| format!("{:02x}", *b as u8))
            .collect()
    }

    /// Parses [`to_hex`](Self::to_hex)'s output (surrounding whitespace
    /// ignored).
    pub fn from_hex(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.len() != 256 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(dist_err(
                "NcclId::from_hex",
                format!("expected 256 hex digits, got {} characters", s.len()),
            ));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, byte) in internal.iter_mut().enumerate() {
            let v = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("checked hex");
            *byte = v as std::ffi::c_char;
        }
        Ok(NcclId(Id::uninit(internal)))
    }

    /// Writes the id to `path` atomically (`<path>.tmp`, then rename).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        std::fs::write(&tmp, self.to_hex())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| dist_err("NcclId::write_file", format!("{}: {e}", path.display())))
    }

    /// Reads an id written by [`write_file`](Self::write_file), polling every
    /// 50 ms until the file exists or `timeout` has passed.
    pub fn read_file(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref();
        let start = Instant::now();
        loop {
            match std::fs::read_to_string(path) {
                Ok(s) => return Self::from_hex(&s),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(dist_err(
                        "NcclId::read_file",
                        format!("{} (after {:?}): {e}", path.display(), start.elapsed()),
                    ))
                }
            }
        }
    }
}

/// Rank, world size and GPU ordinal from the environment (`RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK`; the same names `torchrun` sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK` (the CUDA ordinal to use), `RANK` when unset.
    pub local_rank: usize,
}

impl LaunchEnv {
    /// Reads and checks `RANK < WORLD_SIZE`.
    pub fn from_env() -> Result<Self> {
        let get = |name: &str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                    dist_err(
                        "LaunchEnv::from_env",
                        format!("{name}={v:?} is not a non-negative integer"),
                    )
                }),
            }
        };
        let rank =
            get("RANK")?.ok_or_else(|| dist_err("LaunchEnv::from_env", "RANK is not set"))?;
        let world_size = get("WORLD_SIZE")?
            .ok_or_else(|| dist_err("LaunchEnv::from_env", "WORLD_SIZE is not set"))?;
        if rank >= world_size {
            return Err(dist_err(
                "LaunchEnv::from_env",
                format!("RANK={rank} is not below WORLD_SIZE={world_size}"),
            ));
        }
        let local_rank = get("LOCAL_RANK")?.unwrap_or(rank);
        Ok(Self {
            rank,
            world_size,
            local_rank,
        })
    }
}

/// One rank of an NCCL communicator, bound to one CUDA device and candle's
/// stream on it (see the [module docs](self)).
pub struct NcclComm {
    comm: Comm,
    device: Device,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, {:?})",
            self.rank, self.world, self.device
        )
    }
}

impl NcclComm {
    /// Joins the communicator `id` as `rank` of `world` on `device` (a CUDA
    /// device; collectives run on candle's stream for it). Blocks until all
    /// ranks have joined (`ncclCommInitRank`).
    pub fn new(device: &Device, rank: usize, world: usize, id: &NcclId) -> Result<Self> {
        let who = "NcclComm::new";
        if rank >= world {
            return Err(dist_err(
                who,
                format!("rank {rank} is not below the world size {world}"),
            ));
        }
        let stream = match device {
            Device::Cuda(d) => d.cuda_stream(),
            other => {
                return Err(dist_err(
                    who,
                    format!("NCCL needs a CUDA device, got {:?}", other.location()),
                ))
            }
        };
        // NCCL picks the device from the calling thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| dist_err(who, format!("binding the CUDA context: {e:?}")))?;
        let comm = Comm::from_rank(stream, rank, world, id.0).map_err(|e| {
            dist_err(
                who,
                format!("ncclCommInitRank (rank {rank} of {world}) failed: {e:?}"),
            )
        })?;
        Ok(Self {
            comm,
            device: device.clone(),
            rank,
            world,
        })
    }

    /// [`LaunchEnv::from_env`] for the rank and world size, and the id from
    /// `STEEPEST_NCCL_ID` (hex) or, if unset, `STEEPEST_NCCL_ID_FILE` (rank 0
    /// creates and writes it, the others wait for it up to
    /// `STEEPEST_NCCL_TIMEOUT_S` seconds, default 300).
    pub fn from_env(device: &Device) -> Result<Self> {
        let who = "NcclComm::from_env";
        let env = LaunchEnv::from_env()?;
        let id = if let Ok(hex) = std::env::var("STEEPEST_NCCL_ID") {
            NcclId::from_hex(&hex)?
        } else if let Ok(path) = std::env::var("STEEPEST_NCCL_ID_FILE") {
            if env.rank == 0 {
                let id = NcclId::new()?;
                id.write_file(&path)?;
                id
            } else {
                let secs = match std::env::var("STEEPEST_NCCL_TIMEOUT_S") {
                    Ok(v) => v.trim().parse::<u64>().map_err(|_| {
                        dist_err(
                            who,
                            format!("STEEPEST_NCCL_TIMEOUT_S={v:?} is not a number of seconds"),
                        )
                    })?,
                    Err(_) => 300,
                };
                NcclId::read_file(&path, Duration::from_secs(secs))?
            }
        } else {
            return Err(dist_err(
                who,
                "set STEEPEST_NCCL_ID (hex id) or STEEPEST_NCCL_ID_FILE (a path)",
            ));
        };
        Self::new(device, env.rank, env.world_size, &id)
    }

    /// The CUDA device this rank runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn prepare(&self, op: &str, x: &Tensor) -> Result<Tensor> {
        let who = format!("NcclComm::{op} (rank {})", self.rank);
        check_dtype(&who, x.dtype())?;
        if !x.device().same_device(&self.device) {
            return Err(dist_err(
                &who,
                format!(
                    "the tensor is on {:?}, the communicator on {:?}",
                    x.device().location(),
                    self.device.location()
                ),
            ));
        }
        x.contiguous()
    }

    fn apply(&self, kind: Kind, x: &Tensor) -> Result<Tensor> {
        let x = self.prepare(kind.name(), x)?;
        x.apply_op1_no_bwd(&NcclOp {
            comm: &self.comm,
            kind,
            rank: self.rank,
            world: self.world,
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce(_) => "all_reduce",
            Kind::ReduceScatter(_) => "reduce_scatter",
            Kind::AllGather => "all_gather",
            Kind::Broadcast(_) => "broadcast",
        }
    }
}

fn nccl_op(op: ReduceOp) -> nccl::ReduceOp {
    match op {
        ReduceOp::Sum => nccl::ReduceOp::Sum,
        ReduceOp::Avg => nccl::ReduceOp::Avg,
    }
}

/// One collective as a candle op: the CUDA forward calls NCCL on candle's
/// stream and returns a freshly allocated output.
struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
    rank: usize,
    world: usize,
}

impl NcclOp<'_> {
    fn who(&self) -> String {
        format!("NcclComm::{} (rank {})", self.kind.name(), self.rank)
    }

    fn run<T: CudaDType + NcclType + DeviceRepr>(
        &self,
        s: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let who = self.who();
        let (o1, o2) = layout
            .contiguous_offsets()
            .ok_or_else(|| dist_err(&who, "the input is not contiguous"))?;
        let n = o2 - o1;
        let dev = &s.device;
        let src = s.as_cuda_slice::<T>()?.slice(o1..o2);
        let nccl_err = |e: nccl::result::NcclError| dist_err(&who, format!("NCCL error: {e:?}"));
        self.comm
            .context()
            .bind_to_thread()
            .map_err(|e| dist_err(&who, format!("binding the CUDA context: {e:?}")))?;
        let (out, shape) = match self.kind {
            Kind::AllReduce(op) => {
                // SAFETY: fully written by the collective before any read (same stream).
                let mut out = unsafe { dev.alloc::<T>(n)? };
                self.comm
                    .all_reduce(&src, &mut out, &nccl_op(op))
                    .map_err(nccl_err)?;
                (out, layout.shape().clone())
            }
            Kind::ReduceScatter(op) => {
                if n % self.world != 0 {
                    return Err(dist_err(
                        &who,
                        format!(
                            "the input has {n} elements, not a multiple of the world size {}",
                            self.world
                        ),
                    ));
                }
                let c = n / self.world;
                // SAFETY: as above.
                let mut out = unsafe { dev.alloc::<T>(c)? };
                self.comm
                    .reduce_scatter(&src, &mut out, &nccl_op(op))
                    .map_err(nccl_err)?;
                (out, Shape::from(c))
            }
            Kind::AllGather => {
                // SAFETY: as above.
                let mut out = unsafe { dev.alloc::<T>(n * self.world)? };
                self.comm.all_gather(&src, &mut out).map_err(nccl_err)?;
                (out, Shape::from(n * self.world))
            }
            Kind::Broadcast(root) => {
                if root >= self.world {
                    return Err(dist_err(
                        &who,
                        format!("root {root} is out of range for world size {}", self.world),
                    ));
                }
                // SAFETY: as above.
                let mut out = unsafe { dev.alloc::<T>(n)? };
                self.comm
                    .broadcast(Some(&src), &mut out, root as i32)
                    .map_err(nccl_err)?;
                (out, layout.shape().clone())
            }
        };
        Ok((T::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        "steepest-nccl-collective"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(dist_err(
            &self.who(),
            "the tensor is on the CPU; NCCL needs a CUDA tensor",
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, layout),
            DType::BF16 => self.run::<half::bf16>(s, layout),
            d => Err(dist_err(
                &self.who(),
                format!("dtype {d:?} is not supported (f32 and bf16 are)"),
            )),
        }
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.apply(Kind::AllReduce(op), x)
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.apply(Kind::ReduceScatter(op), x)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(Kind::AllGather, x)
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.apply(Kind::Broadcast(root), x)
    }

    fn barrier(&self) -> Result<()> {
        let one = Tensor::zeros(1, DType::F32, &self.device)?;
        self.all_reduce(&one, ReduceOp::Sum)?;
        self.device.synchronize()
    }
}
