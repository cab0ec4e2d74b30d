//! A real filesystem on the daemon: nbdfuse exposes the export as a file, a loop device
//! turns it into a block device, and ext4 lives on it. Write files, delete some, fstrim
//! (the allocation must shrink), unmount, restart the daemon, then `e2fsck -fn` must be
//! clean and every file's checksum must match.
//!
//! Needs root, /dev/fuse and loop devices; skips loudly without them.

#[macro_use]
mod e2e;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::{allocated_bytes, cmd, need_bins, prerequisite, secs, setup, Backend, Bg, Ctx, Daemon};

e2e_tests!(ext4_on_nbdfuse_loop_survives_restart);

const MIB: usize = 1 << 20;

/// nbdfuse + loop device + mount, torn down in reverse order (also when the test fails).
struct Stack<'a> {
    ctx: &'a Ctx,
    nbdfuse: Option<Bg>,
    fuse_dir: PathBuf,
    loop_dev: Option<String>,
    mnt: Option<PathBuf>,
}

impl<'a> Stack<'a> {
    /// Expose `uri` as `<scratch>/fuse/disk` and attach a loop device to it.
    fn attach(ctx: &'a Ctx, d: &Daemon, read_only: bool) -> Stack<'a> {
        let fuse_dir = ctx.scratch.join("fuse");
        fs::create_dir_all(&fuse_dir).unwrap();
        let pidfile = ctx.scratch.join("nbdfuse.pid");
        let _ = fs::remove_file(&pidfile);
        let mut c = cmd("nbdfuse");
        c.arg("-P").arg(&pidfile);
        if read_only {
            c.arg("-r");
        }
        c.arg(fuse_dir.join("disk")).arg(d.uri());
        let mut bg = ctx.spawn(&mut c);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            assert!(
                bg.is_running(),
                "{}: nbdfuse exited:\n{}",
                ctx.name,
                bg.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "{}: nbdfuse did not come up",
                ctx.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut s = Stack {
            ctx,
            nbdfuse: Some(bg),
            fuse_dir,
            loop_dev: None,
            mnt: None,
        };
        let mut l = cmd("losetup");
        l.args(["--find", "--show"]);
        if read_only {
            l.arg("--read-only");
        }
        let dev = ctx.run(l.arg(s.fuse_dir.join("disk")), secs(30));
        s.loop_dev = Some(dev.trim().to_owned());
        s
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().unwrap()
    }

    fn mount(&mut self, opts: &str) -> PathBuf {
        let mnt = self.ctx.scratch.join("mnt");
        fs::create_dir_all(&mnt).unwrap();
        self.ctx.run(
            cmd("mount")
                .args(["-t", "ext4", "-o", opts, self.dev()])
                .arg(&mnt),
            secs(60),
        );
        self.mnt = Some(mnt.clone());
        mnt
    }

    fn umount(&mut self) {
        if let Some(m) = self.mnt.take() {
            self.ctx.run(cmd("umount").arg(&m), secs(120));
        }
    }

    /// Orderly teardown; errors fail the test.
    fn detach(mut self) {
        self.umount();
        if let Some(dev) = self.loop_dev.take() {
            self.ctx.run(cmd("losetup").args(["-d", &dev]), secs(60));
        }
        // The loop driver lets go of the file asynchronously; unmount may say "busy" briefly.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self
                .ctx
                .run_status(cmd("fusermount3").arg("-u").arg(&self.fuse_dir), secs(30));
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: fusermount3 -u failed: {}",
                self.ctx.name,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(mut bg) = self.nbdfuse.take() {
            bg.wait_ok(secs(60));
        }
    }
}

impl Drop for Stack<'_> {
    fn drop(&mut self) {
        // Only reached with something left attached when the test already failed: best
        // effort, lazy, never hanging the test run.
        if let Some(m) = self.mnt.take() {
            let _ = self
                .ctx
                .run_status(cmd("umount").arg("-l").arg(&m), secs(30));
        }
        if let Some(dev) = self.loop_dev.take() {
            let _ = self
                .ctx
                .run_status(cmd("losetup").args(["-d", &dev]), secs(30));
        }
        if self.nbdfuse.is_some() {
            let _ = self.ctx.run_status(
                cmd("fusermount3").arg("-u").arg("-z").arg(&self.fuse_dir),
                secs(30),
            );
        }
    }
}

/// Deterministic file contents.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    // Some compressible stretches too.
    if len > 64 * 1024 {
        v[len / 3..len / 3 + 32 * 1024].fill(b'a');
    }
    v
}

fn sha(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn write_files(
    root: &Path,
    first: u64,
    count: u64,
    files: &mut BTreeMap<PathBuf, String>,
) -> usize {
    let mut total = 0;
    for i in first..first + count {
        let dir = root.join(format!("d{}", i % 4));
        fs::create_dir_all(&dir).unwrap();
        let len = match i % 5 {
            0 => 1000 + i as usize,
            1 => 64 * 1024,
            2 => 3 * MIB + 123,
            3 => 512 * 1024 + 17,
            _ => 8 * MIB,
        };
        let data = content(i, len);
        let rel = PathBuf::from(format!("d{}/f{i:03}.bin", i % 4));
        fs::write(root.join(&rel), &data).unwrap();
        files.insert(rel, sha(&data));
        total += len;
    }
    total
}

fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn ext4_on_nbdfuse_loop_survives_restart(backend: Backend) {
    let test = "ext4_on_nbdfuse_loop_survives_restart";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !prerequisite(&ctx.name, root, "needs root (loop devices, mount)")
        || !prerequisite(&ctx.name, Path::new("/dev/fuse").exists(), "no /dev/fuse")
        || !prerequisite(
            &ctx.name,
            Path::new("/dev/loop-control").exists(),
            "no /dev/loop-control",
        )
        || !need_bins(
            &ctx.name,
            &[
                "nbdfuse",
                "fusermount3",
                "losetup",
                "mkfs.ext4",
                "e2fsck",
                "mount",
                "umount",
                "fstrim",
                "nbdinfo",
            ],
        )
    {
        return;
    }
    let mut d = ctx.daemon(&["--default-size", "256M"]);
    let mut files = BTreeMap::new();
    {
        let mut s = Stack::attach(&ctx, &d, false);
        ctx.run(
            cmd("mkfs.ext4").args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                s.dev(),
            ]),
            secs(120),
        );
        let mnt = s.mount("rw");
        write_files(&mnt, 0, 20, &mut files);
        sync();
        let before = allocated_bytes(&ctx, &d.uri());
        // Delete the big files, trim, and the export must give the space back.
        let mut deleted = 0;
        for i in (0..20u64).filter(|i| i % 5 == 4 || i % 5 == 2) {
            let rel = PathBuf::from(format!("d{}/f{i:03}.bin", i % 4));
            deleted += fs::metadata(mnt.join(&rel)).unwrap().len();
            fs::remove_file(mnt.join(&rel)).unwrap();
            files.remove(&rel);
        }
        sync();
        let trim = ctx.run(cmd("fstrim").arg("-v").arg(&mnt), secs(120));
        eprintln!("{}: {}", ctx.name, trim.trim());
        sync();
        let after = allocated_bytes(&ctx, &d.uri());
        eprintln!(
            "{}: allocated {} MiB before, {} MiB after deleting {} MiB and fstrim",
            ctx.name,
            before >> 20,
            after >> 20,
            deleted >> 20
        );
        assert!(
            before.saturating_sub(after) >= deleted / 2,
            "{}: fstrim freed only {} of {deleted} deleted bytes",
            ctx.name,
            before.saturating_sub(after)
        );
        // Reuse the freed space.
        write_files(&mnt, 20, 6, &mut files);
        s.detach();
    }
    d.stop();
    d.restart();
    {
        let mut s = Stack::attach(&ctx, &d, true);
        let fsck = ctx.run_status(cmd("e2fsck").args(["-fn", s.dev()]), secs(120));
        assert!(
            fsck.status.success(),
            "{}: e2fsck -fn found problems ({}):\n{}{}",
            ctx.name,
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let mnt = s.mount("ro,noload");
        for (rel, want) in &files {
            let got = sha(&fs::read(mnt.join(rel)).unwrap());
            assert_eq!(
                &got,
                want,
                "{}: {} differs after restart",
                ctx.name,
                rel.display()
            );
        }
        eprintln!("{}: e2fsck clean, {} files verified", ctx.name, files.len());
        s.detach();
    }
    d.stop();
}
