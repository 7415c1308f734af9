//! `ferry image` (a RAM image of synthetic content) and `ferry tls-cert` (a
//! self-signed certificate and its key).

use crate::cli::args::*;
use crate::cli::guest::usage;
use anyhow::{Context, Result};
use ferry::memory::GuestMemory;
use ferry::units::Bytes;
use std::process::ExitCode;

pub fn tls_cert(a: TlsCertArgs) -> Result<ExitCode> {
    let (cert, key) =
        ferry::transport::tls::TlsServer::generate_pem().map_err(anyhow::Error::msg)?;
    std::fs::write(&a.cert, cert)?;
    ferry::migration::auth::write_secret_file(&a.key, key.as_bytes())?;
    println!("wrote {} and {}", a.cert.display(), a.key.display());
    Ok(ExitCode::SUCCESS)
}

pub fn image(a: ImageArgs) -> Result<ExitCode> {
    let mem = GuestMemory::new(a.memory).map_err(|e| usage(format!("--memory: {e}")))?;
    a.fill.fill(&mem, a.seed, 2);
    let written = mem
        .save_image(&a.out)
        .with_context(|| format!("writing the image {}", a.out.display()))?;
    println!(
        "wrote {} image to {}: fill {}, seed {}, {:.1}% non-zero pages",
        Bytes(a.memory),
        a.out.display(),
        a.fill,
        a.seed,
        100.0 * written as f64 / mem.pages() as f64
    );
    Ok(ExitCode::SUCCESS)
}
