static CAPTURE: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-capture"));
fn main() {
    let mut ebpf = aya::Ebpf::load(CAPTURE).unwrap();
    for (n, _) in ebpf.programs() { println!("{n}"); }
    let _ = &mut ebpf;
}
