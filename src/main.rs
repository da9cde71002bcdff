//! The `jetsync` binary: a thin shell over the library.

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        None | Some("--version" | "-V" | "version") => {
            println!("jetsync {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Some("demo") => {
            println!(
                "jetsync {}: the demo arrives with the CLI; run `cargo test` to see replication checks",
                env!("CARGO_PKG_VERSION")
            );
            Ok(())
        }
        Some(other) => anyhow::bail!("unknown command {other:?}; try `jetsync --version`"),
    }
}
