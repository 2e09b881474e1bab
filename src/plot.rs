//! Small scatter/line plots written as PNG (RGB, zlib with stored blocks: no compressor, any
//! viewer reads it), for benchmark results a reader would rather see than read. Labels use
//! 8×8 bitmap glyphs.

use std::path::Path;

use crate::error::{Error, Result};

/// One series: points joined in x order, drawn in `color`.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub color: [u8; 3],
    /// Whether to join the points with lines.
    pub lines: bool,
    /// (x, y, point label).
    pub points: Vec<(f64, f64, String)>,
}

/// A plot: title, axis names, series; y on a log scale when `log_y`.
#[derive(Debug, Clone)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_y: bool,
    pub series: Vec<Series>,
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![[255, 255, 255]; w * h],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            self.px[y as usize * self.w + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn dot(&mut self, (x, y): (i64, i64), r: i64, c: [u8; 3]) {
        for dy in -r..=r {
            for dx in -r..=r {
                if dx * dx + dy * dy <= r * r {
                    self.set(x + dx, y + dy, c);
                }
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = font8x8::legacy::BASIC_LEGACY
                .get(ch as usize)
                .copied()
                .unwrap_or([0; 8]);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + 8 * i as i64 + col, y + row as i64, c);
                    }
                }
            }
        }
    }

    /// Text rotated a quarter turn counter-clockwise, reading upwards from (x, y).
    fn text_up(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let g = font8x8::legacy::BASIC_LEGACY
                .get(ch as usize)
                .copied()
                .unwrap_or([0; 8]);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + row as i64, y - 8 * i as i64 - col, c);
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(self.h * (1 + 3 * self.w));
        for row in self.px.chunks(self.w) {
            raw.push(0);
            for p in row {
                raw.extend_from_slice(p);
            }
        }
        png_bytes(self.w as u32, self.h as u32, &raw)
    }
}

/// CRC-32 (ISO-HDLC) as PNG chunks use it.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// An RGB PNG from filtered scanlines (`raw`), in zlib stored blocks.
fn png_bytes(w: u32, h: u32, raw: &[u8]) -> Vec<u8> {
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        z.extend_from_slice(&(b.len() as u16).to_le_bytes());
        z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in raw {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// A short number for an axis tick.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || v.abs() < 0.01 {
        format!("{v:.0e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl Plot {
    /// The plot as PNG bytes (`w` × `h` pixels).
    pub fn png(&self, w: usize, h: usize) -> Vec<u8> {
        let mut c = Canvas::new(w, h);
        let (left, right, top, bottom) = (80i64, 20i64, 40i64, 60i64);
        let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
        let ty = |y: f64| if self.log_y { y.max(1e-12).log10() } else { y };
        let pts = self.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y, _) in pts {
            x0 = x0.min(*x);
            x1 = x1.max(*x);
            y0 = y0.min(ty(*y));
            y1 = y1.max(ty(*y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let (mx, my) = (((x1 - x0) * 0.08).max(1e-9), ((y1 - y0) * 0.08).max(1e-9));
        let (x0, x1, y0, y1) = (x0 - mx, x1 + mx, y0 - my, y1 + my);
        let sx = |x: f64| left + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
        let sy = |y: f64| top + ph - ((ty(y) - y0) / (y1 - y0) * ph as f64).round() as i64;
        let black = [0, 0, 0];
        let grey = [220, 220, 220];
        // Grid and ticks.
        for i in 0..=5 {
            let fx = x0 + (x1 - x0) * i as f64 / 5.0;
            let px = sx(fx);
            c.line((px, top), (px, top + ph), grey);
            c.text(px - 16, top + ph + 8, &tick_label(fx), black);
        }
        let yticks: Vec<f64> = if self.log_y {
            (y0.floor() as i64..=y1.ceil() as i64)
                .map(|e| 10f64.powi(e as i32))
                .filter(|v| ty(*v) >= y0 && ty(*v) <= y1)
                .collect()
        } else {
            (0..=5).map(|i| y0 + (y1 - y0) * i as f64 / 5.0).collect()
        };
        for v in yticks {
            let py = sy(v);
            c.line((left, py), (left + pw, py), grey);
            let l = tick_label(v);
            c.text(left - 8 - 8 * l.len() as i64, py - 4, &l, black);
        }
        c.line((left, top), (left, top + ph), black);
        c.line((left, top + ph), (left + pw, top + ph), black);
        c.line((left + pw, top), (left + pw, top + ph), black);
        c.line((left, top), (left + pw, top), black);
        c.text(left, 12, &self.title, black);
        c.text(
            left + pw / 2 - 4 * self.x_label.len() as i64,
            h as i64 - 24,
            &self.x_label,
            black,
        );
        c.text_up(
            16,
            top + ph / 2 + 4 * self.y_label.len() as i64,
            &self.y_label,
            black,
        );
        // Series, then the legend.
        for s in &self.series {
            let mut p: Vec<&(f64, f64, String)> = s.points.iter().collect();
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            if s.lines {
                for w2 in p.windows(2) {
                    c.line(
                        (sx(w2[0].0), sy(w2[0].1)),
                        (sx(w2[1].0), sy(w2[1].1)),
                        s.color,
                    );
                }
            }
            for (x, y, l) in &p {
                c.dot((sx(*x), sy(*y)), 4, s.color);
                if !l.is_empty() {
                    c.text(sx(*x) + 6, sy(*y) - 12, l, s.color);
                }
            }
        }
        for (i, s) in self.series.iter().enumerate() {
            let y = top + 10 + 14 * i as i64;
            c.dot((left + pw - 150, y + 3), 4, s.color);
            c.text(left + pw - 140, y, &s.label, s.color);
        }
        c.png()
    }

    /// Writes the plot to `path` as PNG.
    pub fn write(&self, path: &Path, w: usize, h: usize) -> Result<()> {
        std::fs::write(path, self.png(w, h)).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_png_header_are_standard() {
        // The CRC-32 check value of "123456789".
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let p = Plot {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_y: true,
            series: vec![Series {
                label: "s".into(),
                color: [200, 0, 0],
                lines: true,
                points: vec![(1.0, 0.1, "a".into()), (2.0, 0.01, String::new())],
            }],
        };
        let b = p.png(64, 48);
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: 64 × 48, 8-bit RGB.
        assert_eq!(&b[16..24], &[0, 0, 0, 64, 0, 0, 0, 48]);
        assert_eq!(&b[24..26], &[8, 2]);
        assert_eq!(&b[b.len() - 8..b.len() - 4], b"IEND");
    }
}
