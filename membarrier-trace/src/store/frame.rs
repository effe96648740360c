//! A recording's bytes: [`MAGIC`], then frames, each `length (u32 LE) | CRC-32 of the payload
//! (u32 LE) | payload`, the payload deflated. A frame is written with one `write`; a run cut off
//! (SIGKILL, a full disk, a crash) leaves at most one frame short or torn, and a reader takes
//! every frame before it: those are whole, by their length and CRC.

use std::io::Write;

/// The file's first bytes: the name, and the frame layout's version.
pub const MAGIC: &[u8; 8] = b"MBTRACE\x01";

/// The largest frame a reader takes (a damaged length must not make it allocate gigabytes).
const MAX_FRAME: usize = 256 << 20;

/// CRC-32 (IEEE, reflected), as gzip and zlib have it.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Writes `data` as one frame, deflated, with a single `write` call where the kernel takes it
/// whole (a regular file does, unless the disk fills). Returns the bytes written.
pub fn write_frame(out: &mut impl Write, data: &[u8]) -> std::io::Result<usize> {
    let packed = miniz_oxide::deflate::compress_to_vec(data, 6);
    let mut frame = Vec::with_capacity(packed.len() + 8);
    frame.extend((packed.len() as u32).to_le_bytes());
    frame.extend(crc32(&packed).to_le_bytes());
    frame.extend(packed);
    out.write_all(&frame)?;
    Ok(frame.len())
}

/// The whole frames of a recording's bytes (after [`MAGIC`]), inflated, and how many bytes
/// after them were not a whole frame (a run cut off mid-write).
pub fn read_frames(bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap());
        let Some(payload) = bytes.get(at + 8..at + 8 + len).filter(|_| len <= MAX_FRAME) else {
            break;
        };
        if crc32(payload) != crc {
            break;
        }
        let Ok(data) = miniz_oxide::inflate::decompress_to_vec_with_limit(payload, MAX_FRAME)
        else {
            break;
        };
        frames.push(data);
        at += 8 + len;
    }
    (frames, bytes.len() - at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_the_standard_one() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    /// Every cut of a file of three frames reads back the frames whole before the cut, and
    /// a flipped byte ends the reading at its frame.
    #[test]
    fn a_cut_file_reads_up_to_its_last_whole_frame() {
        let mut file = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3u8 {
            write_frame(&mut file, &vec![i; 1000 + usize::from(i)]).unwrap();
            ends.push(file.len());
        }
        for cut in 0..=file.len() {
            let (frames, rest) = read_frames(&file[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(frames.len(), whole, "cut at {cut}");
            assert_eq!(rest, cut - if whole == 0 { 0 } else { ends[whole - 1] });
            for (i, f) in frames.iter().enumerate() {
                assert_eq!(f, &vec![i as u8; 1000 + i]);
            }
        }
        let mut bad = file.clone();
        bad[ends[0] + 12] ^= 1;
        assert_eq!(read_frames(&bad).0.len(), 1);
    }
}
