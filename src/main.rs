fn main() -> std::process::ExitCode {
    streamblk::cli::main()
}
