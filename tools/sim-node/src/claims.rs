//! Claim mounts, as a container sees them: with `--pvc-root`, a claim named `X` is the
//! directory `<pvc-root>/X` (often a symlink to where its files live), and a pod's process runs
//! in a mount namespace of its own where each claim it mounts is hidden under an empty tmpfs
//! and only its volume mounts (`subPath` → `mountPath`, read-only where asked) are seen — so a
//! job mounting its own working directory cannot read another job's on the same claim, as in a
//! real cluster. Needs root (CAP_SYS_ADMIN); without `--pvc-root` claims are not mounted at all
//! (the process sees the host's files where they are).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Container, Pod};

/// One volume mount of a claim: where its files are, where the process sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The claim's directory (resolved), joined with the mount's sub-path.
    pub source: PathBuf,
    /// The mount path.
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What a pod's process needs set up: its binds, and the claims' directories to hide.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The volume mounts of claims, in order.
    pub binds: Vec<Bind>,
    /// The claims' own directories (resolved): hidden, everything of them but the binds.
    pub hide: Vec<PathBuf>,
}

/// The plan of a container's claim mounts under `root`. A claim not there yet is made, empty
/// (as a provisioner makes a volume for a new claim), and so is a missing sub-path (a kubelet
/// makes it as a directory); an error names a sub-path that leaves its claim. A mount path
/// outside every claim's directory that the host does not have is left out.
pub fn plan(root: &Path, pod: &Pod, container: &Container) -> Result<Plan, String> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    let mut plan = Plan::default();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(claim) = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone())
        else {
            continue;
        };
        let made = std::fs::create_dir_all(root.join(&claim));
        let base =
            made.and_then(|()| std::fs::canonicalize(root.join(&claim))).map_err(|e| format!("claim {claim}: {e}"))?;
        let sub = mount.sub_path.as_deref().unwrap_or("").trim_matches('/');
        if sub.split('/').any(|part| part == "..") {
            return Err(format!("sub-path {sub:?} of claim {claim} leaves it"));
        }
        let source = if sub.is_empty() { base.clone() } else { base.join(sub) };
        if !source.exists() {
            std::fs::create_dir_all(&source).map_err(|e| format!("sub-path {sub:?} of claim {claim}: {e}"))?;
        }
        let source = std::fs::canonicalize(&source).map_err(|e| format!("sub-path {sub:?} of claim {claim}: {e}"))?;
        if !source.starts_with(&base) {
            return Err(format!("sub-path {sub:?} of claim {claim} leaves it"));
        }
        if !plan.hide.contains(&base) {
            plan.hide.push(base);
        }
        plan.binds.push(Bind {
            source,
            target: PathBuf::from(&mount.mount_path),
            read_only: mount.read_only == Some(true),
        });
    }
    // Processes share the host's file system: a mount point is made only under a claim's own
    // (hidden) directory, as Galaxy mounts its files at their own paths. A mount path that
    // is neither there nor on the host is left out (the host is not changed for a pod).
    let hide = plan.hide.clone();
    plan.binds.retain(|b| b.target.exists() || hide.iter().any(|h| b.target.starts_with(h)));
    Ok(plan)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Everything the child does, prepared before the fork (no allocation after it).
struct Prepared {
    /// (source, staging, target, read-only, is a directory)
    binds: Vec<(CString, CString, CString, bool, bool)>,
    hide: Vec<CString>,
    /// Directories to make under the hidden ones, parents first.
    dirs: Vec<CString>,
    cwd: Option<CString>,
    tmpfs: CString,
    root: CString,
}

/// Makes `command` run in its own mount namespace set up by `plan`; `staging` is a directory
/// of this pod's for the binds' first stop (the claims are hidden before the binds land).
pub fn isolate(
    command: &mut tokio::process::Command,
    plan: &Plan,
    staging: &Path,
    cwd: Option<&Path>,
) -> io::Result<()> {
    std::fs::create_dir_all(staging)?;
    let mut prepared = Prepared {
        binds: Vec::new(),
        hide: plan.hide.iter().map(|h| c_path(h)).collect::<io::Result<_>>()?,
        dirs: Vec::new(),
        cwd: cwd.map(c_path).transpose()?,
        tmpfs: CString::new("tmpfs").unwrap_or_default(),
        root: CString::new("/").unwrap_or_default(),
    };
    for (i, bind) in plan.binds.iter().enumerate() {
        let is_dir = bind.source.is_dir();
        let stage = staging.join(i.to_string());
        if is_dir {
            std::fs::create_dir_all(&stage)?;
        } else {
            std::fs::File::create(&stage)?;
        }
        // The target's ancestors that will be under a hidden directory (made in the tmpfs).
        if let Some(hidden) = plan.hide.iter().find(|h| bind.target.starts_with(h)) {
            let mut dirs: Vec<&Path> = bind
                .target
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(hidden) && *a != hidden.as_path())
                .collect();
            dirs.reverse();
            if is_dir {
                dirs.push(&bind.target);
            }
            for dir in dirs {
                let dir = c_path(dir)?;
                if !prepared.dirs.contains(&dir) {
                    prepared.dirs.push(dir);
                }
            }
        }
        prepared.binds.push((c_path(&bind.source)?, c_path(&stage)?, c_path(&bind.target)?, bind.read_only, is_dir));
    }
    // SAFETY: the closure runs in the forked child before exec; it only makes system calls on
    // what was prepared above (no allocation, no locks).
    unsafe {
        command.pre_exec(move || setup(&prepared));
    }
    Ok(())
}

fn setup(p: &Prepared) -> io::Result<()> {
    let null = std::ptr::null();
    // SAFETY: plain system calls on NUL-terminated strings that live as long as `p`.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(null, p.root.as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null as *const _))?;
        for (source, stage, _, read_only, _) in &p.binds {
            check(libc::mount(source.as_ptr(), stage.as_ptr(), null, libc::MS_BIND | libc::MS_REC, null as *const _))?;
            if *read_only {
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
                check(libc::mount(null, stage.as_ptr(), null, flags, null as *const _))?;
            }
        }
        for hidden in &p.hide {
            check(libc::mount(p.tmpfs.as_ptr(), hidden.as_ptr(), p.tmpfs.as_ptr(), libc::MS_NOSUID, null as *const _))?;
        }
        for dir in &p.dirs {
            if libc::mkdir(dir.as_ptr(), 0o755) != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return Err(io::Error::last_os_error());
            }
        }
        for (_, stage, target, read_only, is_dir) in &p.binds {
            if !is_dir {
                let fd = libc::open(target.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            check(libc::mount(stage.as_ptr(), target.as_ptr(), null, libc::MS_BIND | libc::MS_REC, null as *const _))?;
            if *read_only {
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
                check(libc::mount(null, target.as_ptr(), null, flags, null as *const _))?;
            }
        }
        if let Some(cwd) = &p.cwd {
            check(libc::chdir(cwd.as_ptr()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pods_claim_mounts_are_planned_under_the_root_and_sub_paths_stay_inside() {
        let root = std::env::temp_dir().join(format!("sim-node-claims-{}", std::process::id()));
        std::fs::create_dir_all(root.join("data/jobs/1")).unwrap();
        let base = std::fs::canonicalize(root.join("data")).unwrap();
        let own = base.join("jobs/1"); // Galaxy mounts its files at their own paths
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}},
                        {"name": "new", "persistentVolumeClaim": {"claimName": "fresh"}}],
            "containers": [{"name": "c", "volumeMounts": [
                {"name": "v", "mountPath": own, "subPath": "jobs/1"},
                {"name": "v", "mountPath": "/tmp", "readOnly": true},
                {"name": "v", "mountPath": "/no-such-dir-on-the-host/all"},
                {"name": "new", "mountPath": base.join("jobs/2"), "subPath": "made/by/the/kubelet"}]}]}}))
        .unwrap();
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        let plan = plan(&root, &pod, &container).unwrap();
        let fresh = std::fs::canonicalize(root.join("fresh")).unwrap();
        assert_eq!(plan.hide, [base.clone(), fresh.clone()], "a claim not there yet is made, empty");
        assert_eq!(plan.binds[0], Bind { source: own.clone(), target: own, read_only: false });
        assert!(plan.binds[1].read_only && plan.binds[1].source == base);
        assert_eq!(plan.binds.len(), 3, "a mount path neither on the host nor under a claim is left out");
        assert_eq!(plan.binds[2].source, fresh.join("made/by/the/kubelet"));
        assert!(plan.binds[2].source.is_dir(), "a missing sub-path is made");
        let mut escaping = container.clone();
        escaping.volume_mounts.as_mut().unwrap()[0].sub_path = Some("../etc".into());
        assert!(super::plan(&root, &pod, &escaping).unwrap_err().contains("leaves it"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn a_process_sees_its_own_sub_path_and_nothing_else_of_the_claim() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("not root: mount namespaces are not available, nothing to check here");
            return;
        }
        let root = std::env::temp_dir().join(format!("sim-node-isolate-{}", std::process::id()));
        let data = root.join("store"); // where the claim's files live; the claim is a symlink to it
        std::fs::create_dir_all(data.join("jobs/1")).unwrap();
        std::fs::create_dir_all(data.join("jobs/2")).unwrap();
        std::fs::write(data.join("jobs/1/mine"), "mine\n").unwrap();
        std::fs::write(data.join("jobs/2/theirs"), "theirs\n").unwrap();
        std::fs::write(data.join("input.txt"), "input\n").unwrap();
        std::fs::create_dir_all(root.join("pvcs")).unwrap();
        std::os::unix::fs::symlink(&data, root.join("pvcs/galaxy")).unwrap();
        let (jobs1, theirs, input) = (data.join("jobs/1"), data.join("jobs/2/theirs"), data.join("input.txt"));
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "galaxy"}}],
            "containers": [{"name": "c", "volumeMounts": [
                {"name": "v", "mountPath": jobs1, "subPath": "jobs/1"},
                {"name": "v", "mountPath": input, "subPath": "input.txt", "readOnly": true}]}]}}))
        .unwrap();
        let container = pod.spec.as_ref().unwrap().containers[0].clone();
        let plan = plan(&root.join("pvcs"), &pod, &container).unwrap();
        let script = format!(
            "cat mine; cat {input}; echo new > made; echo no > {input} || echo read-only; cat {theirs} || echo hidden",
            input = input.display(),
            theirs = theirs.display()
        );
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args(["-c", &script]).stderr(std::process::Stdio::null());
        isolate(&mut cmd, &plan, &root.join("staging"), Some(&jobs1)).unwrap();
        let out = cmd.output().await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "mine\ninput\nread-only\nhidden\n");
        assert_eq!(std::fs::read_to_string(jobs1.join("made")).unwrap(), "new\n", "writes land in the claim");
        assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "theirs\n", "the host still sees it all");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
