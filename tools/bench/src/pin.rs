//! CPU pinning for the split-cores creation runs: the control plane (etcd, apiserver,
//! controller-manager, sim-node) on one core, the client side (this process, the worker,
//! the broker) on the other, the same way for the raw run and the worker run. Every thread's
//! previous affinity is restored when the [`Pinned`] guard drops.

use std::collections::HashMap;

fn threads(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

fn affinity(tid: i32) -> Option<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        (libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0).then_some(set)
    }
}

fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> bool {
    // SAFETY: a valid cpu_set_t of the size given.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// Processes pinned to one core each; restores every thread's affinity on drop.
#[derive(Default)]
pub struct Pinned {
    /// Each pinned thread's previous mask.
    saved: HashMap<i32, libc::cpu_set_t>,
    /// Each pinned process's main-thread mask, for threads it started while pinned.
    processes: Vec<(u32, libc::cpu_set_t)>,
}

impl Pinned {
    /// Pins every thread of `pid` to `cpu`. Threads it starts later inherit the pinning.
    pub fn pin(&mut self, pid: u32, cpu: usize) -> std::io::Result<()> {
        // SAFETY: CPU_ZERO / CPU_SET on a local, zeroed cpu_set_t.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            set
        };
        let main = affinity(pid as i32).ok_or_else(std::io::Error::last_os_error)?;
        if !self.processes.iter().any(|(p, _)| *p == pid) {
            self.processes.push((pid, main));
        }
        for tid in threads(pid) {
            if let Some(previous) = affinity(tid) {
                self.saved.entry(tid).or_insert(previous);
            }
            if !set_affinity(tid, &set) {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for (pid, main) in &self.processes {
            for tid in threads(*pid) {
                let _ = set_affinity(tid, self.saved.get(&tid).unwrap_or(main));
            }
        }
    }
}
