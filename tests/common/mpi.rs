//! `mpirun` for integration tests: one constructor, so every test job gets the same flags and its
//! own Open MPI session directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "ferrofold-ompi-";

/// Remove `<tmp>/ferrofold-ompi-<pid>-<n>` of processes no longer alive (Linux: `/proc/<pid>`).
fn remove_stale_bases(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `mpirun --allow-run-as-root --oversubscribe -np <np> <program>`, with a private
/// `orte_tmpdir_base`.
///
/// Open MPI 4.x creates its per-user session directory (`/tmp/ompi.<host>.<uid>`) with a
/// check-then-mkdir that fails with "File exists" when two `mpirun`s on one node start at the same
/// moment (open-mpi/ompi#8510), and removes it again when the last job ends, so the race comes back
/// whenever nextest runs two multi-rank tests side by side. A session base per `mpirun` call (process
/// id + counter) means no two jobs ever create the same directory.
///
/// The bases of test processes that have exited are removed on the next call (Open MPI empties
/// its session directory, but the base stays).
pub fn mpirun(np: usize, program: &str) -> Command {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let tmp = std::env::temp_dir();
    remove_stale_bases(&tmp);
    let base: PathBuf = tmp.join(format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
        program,
    ])
    .env("OMPI_MCA_orte_tmpdir_base", base)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}
