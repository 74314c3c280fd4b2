// Generates the client from the .proto files only; protoc comes from the protoc-bin-vendored crate.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let root = "../../../protos";
    let protos: Vec<String> = ["tensor", "parameter_server", "barrier", "lock"]
        .iter()
        .map(|name| format!("{root}/nanodist/v1/{name}.proto"))
        .collect();
    tonic_build::configure().build_server(false).compile_protos(&protos, &[root])?;
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
