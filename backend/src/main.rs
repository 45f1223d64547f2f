//! The `gpu-backend` binary: a thin shell over [`gpu_backend::cli`].

fn main() -> std::process::ExitCode {
    gpu_backend::cli::main()
}
