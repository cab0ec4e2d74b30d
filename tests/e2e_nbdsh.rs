//! libnbd (the library under nbdsh) against the real daemon: every transmission command and
//! flag we advertise, multi-conn visibility, error replies; then the same store served
//! `--read-only`, where writes must fail with EPERM. The checks live in
//! `tests/e2e/nbd_features.py`; this file runs it and keeps its output.

#[macro_use]
mod e2e;

use e2e::{need_python_nbd, secs, setup, Backend};

const SIZE: &str = "64M";
const SIZE_BYTES: u64 = 64 << 20;

e2e_tests!(libnbd_features_and_read_only);

fn libnbd_features_and_read_only(backend: Backend) {
    let test = "libnbd_features_and_read_only";
    let Some(ctx) = setup(test, backend) else {
        return;
    };
    if !need_python_nbd(&ctx.name) {
        return;
    }
    let size = SIZE_BYTES.to_string();
    let mut d = ctx.daemon(&["--default-size", SIZE]);
    let out = ctx.python("nbd_features.py", &["rw", &d.uri(), &size], secs(120));
    eprintln!("{out}");
    assert!(
        out.contains("ALL OK"),
        "{}: rw checks did not finish:\n{out}",
        ctx.name
    );
    d.stop();

    d.restart_with(&["--default-size", SIZE, "--read-only"]);
    let out = ctx.python("nbd_features.py", &["ro", &d.uri(), &size], secs(120));
    eprintln!("{out}");
    assert!(
        out.contains("ALL OK"),
        "{}: ro checks did not finish:\n{out}",
        ctx.name
    );
    d.stop();

    // Writable again: the read-only run changed nothing.
    d.restart_with(&["--default-size", SIZE]);
    let out = ctx.python(
        "nbd_features.py",
        &["ro-layout", &d.uri(), &size],
        secs(120),
    );
    assert!(
        out.contains("ALL OK"),
        "{}: layout after the read-only run:\n{out}",
        ctx.name
    );
    d.stop();
}
