//! Hostile images (issue 18, findings 1, 2 and 9): each is refused with an error naming the image and the limit,
//! and decoding never holds more memory than a documented bound. One test in its own binary, so the process's
//! peak resident memory (`VmHWM`) is that of these decodes alone.

use std::io::Write;
use std::path::Path;

use flamingo::io::image::{decode_bytes, decode_rgb, load_rgb, DecodeLimits, DEFAULT_MAX_PIXELS};

/// A GIF whose logical screen is 1x1 and whose first frame claims 65535x65535 (a 17 GB RGBA buffer): 35 bytes.
fn gif_frame_bomb() -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend([1, 0, 1, 0, 0x80, 0, 0]); // 1x1 screen, a global table of 2 colours
    g.extend([0, 0, 0, 255, 255, 255]);
    g.extend([0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0]); // frame at 0,0 of 65535x65535
    g.extend([2, 2, 0x4c, 0x01, 0]); // LZW: min code size 2, one tiny sub-block
    g.push(0x3b);
    g
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend(kind);
    out.extend(data);
    let crc = crc32(&out[start..]);
    out.extend(crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn zlib(data_len: usize) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..data_len >> 20 {
        z.write_all(&zeros).unwrap();
    }
    z.finish().unwrap()
}

/// A 1x1 PNG whose ICC profile inflates from 260 KB to 256 MB.
fn png_iccp_bomb() -> Vec<u8> {
    let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
    png_chunk(&mut p, b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0]);
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend(zlib(256 << 20));
    png_chunk(&mut p, b"iCCP", &iccp);
    png_chunk(&mut p, b"IDAT", &zlib_bytes(&[0, 0, 0, 0]));
    png_chunk(&mut p, b"IEND", &[]);
    p
}

fn zlib_bytes(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(data).unwrap();
    z.finish().unwrap()
}

/// A valid black PNG of `side` x `side` pixels.
fn png_black(side: u32) -> Vec<u8> {
    let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend(side.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut p, b"IHDR", &ihdr);
    let row = 1 + 3 * side as usize;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; row];
    for _ in 0..side {
        z.write_all(&zeros).unwrap();
    }
    png_chunk(&mut p, b"IDAT", &z.finish().unwrap());
    png_chunk(&mut p, b"IEND", &[]);
    p
}

/// The process's peak resident memory so far, bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

const PEAK_BOUND: u64 = 512 << 20;

fn refused(bytes: &[u8], name: &str, parts: &[&str]) {
    let limits = DecodeLimits::pixels(DEFAULT_MAX_PIXELS);
    let err = decode_rgb(bytes, Path::new(name), &limits)
        .unwrap_err()
        .to_string();
    for p in std::iter::once(&name).chain(parts) {
        assert!(err.contains(p), "{name}: the error lacks {p:?}: {err}");
    }
}

#[test]
fn hostile_images_are_refused_within_a_memory_bound() {
    assert!(
        decode_bytes(DEFAULT_MAX_PIXELS) < PEAK_BOUND,
        "the documented bound holds one image"
    );
    refused(
        &gif_frame_bomb(),
        "frame-bomb.gif",
        &["more memory", "--max-image-pixels"],
    );
    // An ICC profile is never used (IDEFICS converts to RGB as Pillow does, profile ignored): cut off at the
    // metadata limit and dropped, the image still decodes, and memory stays small.
    let limits = DecodeLimits::pixels(DEFAULT_MAX_PIXELS);
    let rgb = decode_rgb(&png_iccp_bomb(), Path::new("iccp-bomb.png"), &limits).unwrap();
    assert_eq!((rgb.width, rgb.height), (1, 1));
    let peak = peak_rss();
    assert!(
        peak < 64 << 20,
        "the 256 MB ICC profile took {} MB",
        peak >> 20
    );
    // The largest image allowed decodes, within the bound.
    let side = (DEFAULT_MAX_PIXELS as f64).sqrt() as u32 - 1;
    let rgb = decode_rgb(
        &png_black(side),
        Path::new("big.png"),
        &DecodeLimits::pixels(DEFAULT_MAX_PIXELS),
    )
    .unwrap();
    assert_eq!((rgb.width, rgb.height), (side as usize, side as usize));
    drop(rgb);
    let peak = peak_rss();
    assert!(
        peak < PEAK_BOUND,
        "peak memory {} MB, over {} MB",
        peak >> 20,
        PEAK_BOUND >> 20
    );
    // Files that are not regular files are refused, not read.
    let limits = DecodeLimits::pixels(DEFAULT_MAX_PIXELS);
    let err = load_rgb(Path::new("/dev/zero"), &limits)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/dev/zero") && err.contains("not a regular file"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let err = load_rgb(&fifo, &limits).unwrap_err().to_string();
    assert!(
        err.contains("pipe.png") && err.contains("not a regular file"),
        "{err}"
    );
}
