// A 4-bit weight [n, k] in bitsandbytes' layout, dequantized where it is read. Compiled after
// linear_params.wgsl, before linear.wgsl or matvec_q4.wgsl.
//
// `q4` holds, as u32 words read four at a time (the buffer is padded to 16 bytes): the packed
// codes (the row-major tensor cut into blocks of `blocksize`, two codes per byte, the even
// element in the high nibble, little-endian bytes), then the absmax of each block (f32 bits, or with double quantization one u8 code per block,
// four to a word, and from `nested_start` one f32 per `nested_blocksize` blocks).
// `tables` holds the 16-value code book of the quant type at `code_table`, and from 32 the
// 256-value signed dynamic map of the nested codes.

struct Q4Params {
    blocksize: u32,
    // 0: plain f32 absmax; 1: double-quantized.
    double_quant: u32,
    nested_blocksize: u32,
    // Dequantized values are rounded to the dtype the weight was quantized from: 0 f32, 1 bf16,
    // 2 f16 (round to nearest even, as storing into that tensor does).
    round_to: u32,
    code_table: u32,
    absmax_start: u32,
    nested_start: u32,
    offset: f32,
}

@group(0) @binding(4) var<uniform> q: Q4Params;
@group(0) @binding(5) var<storage, read> q4: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> tables: array<f32>;

const DYNAMIC_MAP: u32 = 32u;
// 2^-126, as an exact hex literal: a decimal one is rounded to either neighbouring f32.
const MIN_NORMAL: f32 = 0x1p-126f;

// bitsandbytes' kernels run with fast math: subnormal operands and results are flushed to zero.
fn ftz(v: f32) -> f32 {
    return select(v, 0.0, abs(v) < MIN_NORMAL);
}

fn mul_ftz(a: f32, b: f32) -> f32 {
    return ftz(ftz(a) * ftz(b));
}

// Round to nearest even with `mantissa` bits and smallest normal exponent `min_exp` (f16
// subnormals are a fixed quantum). Power-of-two scaling with ldexp is exact, and WGSL's round()
// breaks ties to even.
fn round_mantissa(v: f32, mantissa: i32, min_exp: i32) -> f32 {
    let a = abs(v);
    if a == 0.0 {
        return v;
    }
    let e = max(i32((bitcast<u32>(a) >> 23u) & 0xffu) - 127, min_exp);
    let quantum_exp = e - mantissa;
    let r = ldexp(round(ldexp(a, -quantum_exp)), quantum_exp);
    return select(r, -r, v < 0.0);
}

// bf16 keeps f32's exponent range, so rounding is on the bits alone: add half a bf16 ulp (less
// one, plus the kept lowest bit: ties to even) and cut the low half. Values here are finite.
fn round_to_bf16(v: f32) -> f32 {
    let bits = bitcast<u32>(v);
    return bitcast<f32>((bits + 0x7fffu + ((bits >> 16u) & 1u)) & 0xffff0000u);
}

fn round_to_dtype(v: f32) -> f32 {
    switch q.round_to {
        case 1u: { return round_to_bf16(v); }
        case 2u: { return round_mantissa(v, 10, -14); }
        default: { return v; }
    }
}

// Word w of the buffer.
fn q4_word(w: u32) -> u32 {
    return q4[w / 4u][w % 4u];
}

fn code(i: u32) -> u32 {
    let byte = (q4_word(i / 8u) >> (8u * ((i / 2u) % 4u))) & 0xffu;
    return select(byte & 0xfu, byte >> 4u, i % 2u == 0u);
}

// The absmax of block b, expanded as dequantize_4bit does: the dynamic map's value times the
// nested absmax (flushed product), then + offset.
fn block_absmax(b: u32) -> f32 {
    if q.double_quant == 0u {
        return bitcast<f32>(q4_word(q.absmax_start + b));
    }
    let c = (q4_word(q.absmax_start + b / 4u) >> (8u * (b % 4u))) & 0xffu;
    let nested = bitcast<f32>(q4_word(q.nested_start + b / q.nested_blocksize));
    return mul_ftz(tables[DYNAMIC_MAP + c], nested) + q.offset;
}

fn weight(n: u32, k: u32) -> f32 {
    let i = n * p.k + k;
    return round_to_dtype(mul_ftz(tables[q.code_table + code(i)], block_absmax(i / q.blocksize)));
}
