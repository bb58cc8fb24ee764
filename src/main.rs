fn main() {
    if let Err(e) = flamingo::cli::run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
