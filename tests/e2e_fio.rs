//! fio's nbd engine with crc32c verification: concurrent random writes (fixed, mixed sizes,
//! overwrites) read back and checked, then again after a clean restart, plus a random-read
//! job that verifies what it reads.

#[macro_use]
mod e2e;

use e2e::{cmd, need_bins, secs, setup, Backend};

e2e_tests!(fio_verify_random_writes_and_reads);

fn fio_verify_random_writes_and_reads(backend: Backend) {
    let test = "fio_verify_random_writes_and_reads";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_bins(&ctx.name, &["fio"]) {
        return;
    }
    // The nbd engine is optional in fio builds.
    let eng = ctx.run_status(cmd("fio").arg("--enghelp=nbd"), secs(30));
    if !e2e::prerequisite(
        &ctx.name,
        eng.status.success() && String::from_utf8_lossy(&eng.stdout).contains("uri"),
        "fio was built without the nbd engine",
    ) {
        return;
    }
    let job = e2e::script("verify.fio");
    let mut d = ctx.daemon(&["--default-size", "128M"]);
    let fio = |uri: &str, verify_only: &str| {
        let out = ctx.run(
            cmd("fio")
                .current_dir(&ctx.scratch.path) // fio leaves *-verify.state files in its cwd
                .arg(&job)
                .env("NBD_URI", uri)
                .env("VERIFY_ONLY", verify_only),
            secs(180),
        );
        assert!(
            !out.contains("verify: bad"),
            "{}: fio verify failure:\n{out}",
            ctx.name
        );
        assert_eq!(
            out.matches("err= 0").count(),
            3,
            "{}: fio jobs did not all succeed:\n{out}",
            ctx.name
        );
        out
    };
    fio(&d.uri(), "0");
    d.stop();
    d.restart();
    fio(&d.uri(), "1");
    // A plain random-read job over the first job's range verifies every block it reads.
    let out = ctx.run(
        cmd("fio").current_dir(&ctx.scratch.path).args([
            "--name=small",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri()),
            "--rw=randread",
            "--bs=4k",
            "--offset=0",
            "--size=16m",
            "--iodepth=32",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]),
        secs(120),
    );
    assert!(
        out.contains("err= 0"),
        "{}: fio randread verify:\n{out}",
        ctx.name
    );
    d.stop();
}
