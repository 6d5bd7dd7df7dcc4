"""cgd_heads.data against fixtures written in each data set's official on-disk format, plus the real data sets.

Every fixture is written here from the format's documentation (and, for the CARS196 .mat files, checked against
the real devkit file when it is available); expected splits and labels are spelled out by hand.
"""
import csv
import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode

from cgd_heads.data import (
    DATASET_READERS,
    BadImageError,
    ImageDataset,
    ImageList,
    create_cgd_transform,
    detect_dataset,
    list_images,
    load_splits,
    read_cars196,
    read_csv,
    read_cub200,
    read_image_folder,
    read_inshop,
    read_omniglot,
    read_sop,
)
from cgd_heads.data import zip_cache
from conftest import SHARED_DATA

DATA_ROOT = SHARED_DATA
IMAGENET_CONFIG = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'interpolation': 'bicubic'}


def write_image(path, size=(32, 24), color=(200, 30, 60), mode='RGB', box=None):
    """Write an image of one colour; with ``box`` (x1, y1, x2, y2) that region is white."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    if box is not None:
        img.paste((255, 255, 255) if mode == 'RGB' else 255, box)
    img.save(path)
    return path


def listing(folder):
    """Every entry below ``folder`` with its size and mtime, to prove nothing was written there."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*'))


# ----------------------------------------------------------------------------------------------------------------
# ImageList


def make_list(root, classes_per_image):
    names = sorted(set(classes_per_image))
    paths = [str(root / f'{i}.png') for i in range(len(classes_per_image))]
    return ImageList(paths, [names.index(c) for c in classes_per_image], names)


class TestImageList:
    def test_validation(self, tmp_path):
        with pytest.raises(ValueError, match='absolute'):
            ImageList(['rel/a.png'], [0], ['a'])
        with pytest.raises(ValueError, match='same length'):
            ImageList([str(tmp_path / 'a.png')], [0, 0], ['a'])
        with pytest.raises(ValueError, match=r'labels must be in \[0, 1\)'):
            ImageList([str(tmp_path / 'a.png')], [1], ['a'])
        with pytest.raises(TypeError, match='labels must be ints'):
            ImageList([str(tmp_path / 'a.png')], ['a'], ['a'])
        with pytest.raises(ValueError, match='unique'):
            ImageList([str(tmp_path / 'a.png')], [0], ['a', 'a'])
        with pytest.raises(ValueError, match='x1 < x2'):
            ImageList([str(tmp_path / 'a.png')], [0], ['a'], boxes=[(5, 0, 5, 3)])
        with pytest.raises(ValueError, match='one box per path'):
            ImageList([str(tmp_path / 'a.png')], [0], ['a'], boxes=[])

    def test_len_num_classes_and_from_class_names(self, tmp_path):
        paths = [str(tmp_path / f'{i}.png') for i in range(3)]
        lst = ImageList.from_class_names(paths, ['b', 'a', 'b'])
        assert len(lst) == 3 and lst.num_classes == 2
        assert lst.class_names == ['a', 'b'] and lst.labels == [1, 0, 1]
        with pytest.raises(ValueError, match="class 'z'"):
            ImageList.from_class_names(paths[:1], ['z'], ['a'])

    def test_subset_classes_relabels(self, tmp_path):
        lst = make_list(tmp_path, ['a', 'b', 'c', 'b', 'd'])
        sub = lst.subset_classes([3, 1])
        assert sub.class_names == ['b', 'd']
        assert sub.paths == [lst.paths[1], lst.paths[3], lst.paths[4]]
        assert sub.labels == [0, 0, 1]
        with pytest.raises(ValueError, match=r'ints in \[0, 4\)'):
            lst.subset_classes([4])

    @pytest.mark.parametrize('held_out, expected_count', [(3, 3), (0.25, 2), (0.5, 4), (1, 1)])
    def test_split_classes_disjoint_deterministic(self, tmp_path, held_out, expected_count):
        classes = [f'c{i}' for i in range(8) for _ in range(3)]
        lst = make_list(tmp_path, classes)
        class_of = dict(zip(lst.paths, classes))
        kept, held = lst.split_classes(held_out, seed=7)
        again_kept, again_held = lst.split_classes(held_out, seed=7)
        assert held.class_names == again_held.class_names and kept.paths == again_kept.paths
        assert held.num_classes == expected_count and kept.num_classes == 8 - expected_count
        assert set(held.class_names).isdisjoint(kept.class_names)
        assert sorted(kept.paths + held.paths) == sorted(lst.paths)
        for part in (kept, held):
            # every image keeps its class name through the relabelling
            assert all(part.class_names[lab] == class_of[p] for p, lab in zip(part.paths, part.labels))
            assert sorted(set(part.labels)) == list(range(part.num_classes))

    def test_split_classes_seed_changes_choice(self, tmp_path):
        lst = make_list(tmp_path, [f'c{i:02d}' for i in range(40)])
        draws = {tuple(lst.split_classes(5, seed=s)[1].class_names) for s in range(4)}
        assert len(draws) > 1

    def test_split_classes_bad_arguments(self, tmp_path):
        lst = make_list(tmp_path, ['a', 'b', 'c'])
        for bad in (0, 3, 0.0, 1.0, 0.1):  # 0.1 * 3 rounds to 0 classes
            with pytest.raises(ValueError, match='held_out'):
                lst.split_classes(bad)
        with pytest.raises(TypeError, match='held_out'):
            lst.split_classes('1')
        with pytest.raises(ValueError, match='at least 2 classes'):
            make_list(tmp_path, ['a', 'a']).split_classes(1)


# ----------------------------------------------------------------------------------------------------------------
# CUB-200-2011


def write_cub(root, with_boxes=True):
    """CUB_200_2011 layout: images.txt, image_class_labels.txt, classes.txt, bounding_boxes.txt, images/."""
    base = root / 'CUB_200_2011'
    base.mkdir(parents=True)
    (base / 'classes.txt').write_text(''.join(f'{c} {c:03d}.Bird_{c}\n' for c in range(1, 201)))
    # image id -> class id; ids deliberately not in class order
    images = {1: 1, 2: 100, 3: 101, 4: 2, 5: 200, 6: 1}
    lines, labels, boxes = [], [], []
    for image_id, class_id in images.items():
        rel = f'{class_id:03d}.Bird_{class_id}/Bird_{class_id}_{image_id:04d}.jpg'
        write_image(base / 'images' / rel, size=(60, 40), color=(20, 20, 20), box=(10, 5, 30, 20))
        lines.append(f'{image_id} {rel}\n')
        labels.append(f'{image_id} {class_id}\n')
        boxes.append(f'{image_id} 10.0 5.0 20.0 15.0\n')
    (base / 'images.txt').write_text(''.join(lines))
    (base / 'image_class_labels.txt').write_text(''.join(labels))
    if with_boxes:
        (base / 'bounding_boxes.txt').write_text(''.join(boxes))
    return base


class TestCub200:
    def test_splits_labels_names(self, tmp_path):
        base = write_cub(tmp_path)
        for root in (tmp_path, base):  # the CUB_200_2011 folder or its parent
            splits = read_cub200(root)
            assert set(splits) == {'train', 'test'}
            train, test = splits['train'], splits['test']
            assert train.class_names == ['001.Bird_1', '002.Bird_2', '100.Bird_100']
            assert [Path(p).name for p in train.paths] == ['Bird_1_0001.jpg', 'Bird_100_0002.jpg',
                                                           'Bird_2_0004.jpg', 'Bird_1_0006.jpg']
            assert train.labels == [0, 2, 1, 0]
            assert test.class_names == ['101.Bird_101', '200.Bird_200'] and test.labels == [0, 1]
            assert train.paths[0] == str(base / 'images' / '001.Bird_1' / 'Bird_1_0001.jpg')
            assert train.boxes is None

    def test_crop(self, tmp_path):
        write_cub(tmp_path)
        train = read_cub200(tmp_path, crop=True)['train']
        # x y w h = 10 5 20 15  ->  (x1, y1, x2, y2) = (10, 5, 30, 20)
        assert train.boxes == [(10, 5, 30, 20)] * 4
        img, label = ImageDataset(train)[0]
        assert img.size == (20, 15) and label == 0
        assert np.asarray(img).mean() > 240  # only the white box region is left (JPEG: nearly 255)

    def test_crop_needs_boxes_file_and_consistent_ids(self, tmp_path):
        base = write_cub(tmp_path, with_boxes=False)
        assert read_cub200(tmp_path)['test'].labels == [0, 1]
        with pytest.raises(FileNotFoundError, match='bounding_boxes.txt'):
            read_cub200(tmp_path, crop=True)
        with open(base / 'images.txt', 'a') as f:
            f.write('7 001.Bird_1/extra.jpg\n')
        with pytest.raises(ValueError, match='no class for image id 7'):
            read_cub200(tmp_path)

    def test_missing_root(self, tmp_path):
        with pytest.raises(FileNotFoundError, match='does not exist'):
            read_cub200(tmp_path / 'nope')
        with pytest.raises(FileNotFoundError, match='images.txt'):
            read_cub200(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# CARS196


CAR_NAMES = [f'Make{i} Model{i} {2000 + i % 13}' for i in range(1, 197)]
BOX_FIELDS = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2')


def mat_struct_array(rows, fields):
    """A 1 x N MATLAB struct array as the devkit stores it: every value a 2-D array ([[39]], ['00001.jpg'])."""
    arr = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for i, row in enumerate(rows):
        arr[0, i] = tuple(np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16)
                          for v in (row[f] for f in fields))
    return arr


def mat_cell_of_strings(strings):
    cell = np.empty((1, len(strings)), dtype=object)
    for i, s in enumerate(strings):
        cell[0, i] = np.array([s])
    return cell


def car_row(class_id, fname_field, fname, box=(11, 6, 30, 20), **extra):
    return dict(zip(BOX_FIELDS, box), **{'class': class_id, fname_field: fname}, **extra)


def write_cars_devkit(root, with_test=True):
    """Official devkit: devkit/cars_{train,test}_annos*.mat, devkit/cars_meta.mat, cars_train/, cars_test/."""
    fields = (*BOX_FIELDS, 'class', 'fname')
    train = [car_row(98, 'fname', '00001.jpg'), car_row(1, 'fname', '00002.jpg'),
             car_row(99, 'fname', '00003.jpg'), car_row(196, 'fname', '00004.jpg'), car_row(1, 'fname', '00005.jpg')]
    (root / 'devkit').mkdir(parents=True)
    scipy.io.savemat(root / 'devkit' / 'cars_train_annos.mat', {'annotations': mat_struct_array(train, fields)})
    scipy.io.savemat(root / 'devkit' / 'cars_meta.mat', {'class_names': mat_cell_of_strings(CAR_NAMES)})
    for row in train:
        write_image(root / 'cars_train' / row['fname'], size=(40, 30), color=(0, 0, 0), box=(10, 5, 30, 20))
    if with_test:
        # a single annotation: scipy squeezes a 1 x 1 struct array to a bare struct
        test = [car_row(5, 'fname', '00001.jpg')]
        scipy.io.savemat(root / 'devkit' / 'cars_test_annos_withlabels.mat',
                         {'annotations': mat_struct_array(test, fields)})
        write_image(root / 'cars_test' / '00001.jpg', size=(40, 30))


class TestCars196:
    def test_devkit_train_and_test_annotations(self, tmp_path):
        write_cars_devkit(tmp_path)
        splits = read_cars196(tmp_path)
        train, test = splits['train'], splits['test']
        assert train.class_names == [CAR_NAMES[0], CAR_NAMES[4], CAR_NAMES[97]]
        assert train.paths == [str(tmp_path / 'cars_train' / '00001.jpg'), str(tmp_path / 'cars_train' / '00002.jpg'),
                               str(tmp_path / 'cars_train' / '00005.jpg'), str(tmp_path / 'cars_test' / '00001.jpg')]
        assert train.labels == [2, 0, 0, 1]
        assert test.class_names == [CAR_NAMES[98], CAR_NAMES[195]] and test.labels == [0, 1]
        assert test.paths == [str(tmp_path / 'cars_train' / f'0000{i}.jpg') for i in (3, 4)]
        assert train.boxes is None

    def test_devkit_train_only_and_crop(self, tmp_path):
        write_cars_devkit(tmp_path, with_test=False)
        splits = read_cars196(tmp_path, crop=True)
        assert len(splits['train']) == 3 and len(splits['test']) == 2
        # MATLAB 1-based inclusive (11, 6, 30, 20) -> PIL (10, 5, 30, 20)
        assert splits['train'].boxes == [(10, 5, 30, 20)] * 3
        img, _ = ImageDataset(splits['train'])[0]
        assert img.size == (20, 15) and np.asarray(img).mean() > 240

    def test_combined_cars_annos(self, tmp_path):
        fields = ('relative_im_path', *BOX_FIELDS, 'class', 'test')
        rows = [car_row(c, 'relative_im_path', f'car_ims/{i:06d}.jpg', test=t)
                for i, (c, t) in enumerate([(1, 0), (150, 1), (98, 1), (99, 0)], start=1)]
        scipy.io.savemat(tmp_path / 'cars_annos.mat', {'annotations': mat_struct_array(rows, fields),
                                                       'class_names': mat_cell_of_strings(CAR_NAMES)})
        splits = read_cars196(tmp_path, crop=True)
        assert splits['train'].paths == [str(tmp_path / 'car_ims' / f'00000{i}.jpg') for i in (1, 3)]
        assert splits['train'].class_names == [CAR_NAMES[0], CAR_NAMES[97]] and splits['train'].labels == [0, 1]
        assert splits['test'].class_names == [CAR_NAMES[98], CAR_NAMES[149]] and splits['test'].labels == [1, 0]
        assert splits['test'].boxes == [(10, 5, 30, 20)] * 2

    def test_errors(self, tmp_path):
        with pytest.raises(FileNotFoundError, match='cars_annos.mat'):
            read_cars196(tmp_path)
        write_cars_devkit(tmp_path, with_test=False)
        (tmp_path / 'devkit' / 'cars_meta.mat').unlink()
        with pytest.raises(FileNotFoundError, match='cars_meta.mat'):
            read_cars196(tmp_path)
        scipy.io.savemat(tmp_path / 'devkit' / 'cars_meta.mat', {'class_names': mat_cell_of_strings(CAR_NAMES[:50])})
        with pytest.raises(ValueError, match=r'class 98, expected 1\.\.50'):
            read_cars196(tmp_path)
        (tmp_path / 'devkit' / 'cars_train_annos.mat').write_bytes(b'not a MATLAB file')
        with pytest.raises(ValueError, match='cannot read .*cars_train_annos.mat'):
            read_cars196(tmp_path)

    def test_devkit_with_class_folders(self, tmp_path):
        # the shared copy's layout: devkit/*.mat + images/NNN.<name>/<fname>, no cars_train/
        write_cars_devkit(tmp_path, with_test=False)
        for path in sorted((tmp_path / 'cars_train').iterdir()):
            class_id = {'00001.jpg': 98, '00002.jpg': 1, '00003.jpg': 99, '00004.jpg': 196, '00005.jpg': 1}[path.name]
            folder = tmp_path / 'images' / f'{class_id:03d}.{CAR_NAMES[class_id - 1].replace(" ", "_")}'
            folder.mkdir(parents=True, exist_ok=True)
            path.rename(folder / path.name)
        (tmp_path / 'cars_train').rmdir()
        assert detect_dataset(tmp_path) == 'cars196'
        splits = load_splits('auto', tmp_path)
        train, test = splits['train'], splits['test']
        assert [Path(p).relative_to(tmp_path).as_posix() for p in train.paths] == [
            'images/098.Make98_Model98_2007/00001.jpg', 'images/001.Make1_Model1_2001/00002.jpg',
            'images/001.Make1_Model1_2001/00005.jpg']  # annotation order, as the other layouts
        assert [Path(p).parent.name[:3] for p in test.paths] == ['099', '196']
        assert train.labels == [1, 0, 0] and train.class_names == [CAR_NAMES[0], CAR_NAMES[97]]
        with pytest.raises(ValueError, match='crop=True: the boxes .* refer to the original images'):
            read_cars196(tmp_path, crop=True)
        moved = tmp_path / 'images' / '099.Make99_Model99_2008' / '00003.jpg'
        moved.rename(tmp_path / 'images' / '001.Make1_Model1_2001' / '00003.jpg')  # filed under the wrong class
        with pytest.raises(FileNotFoundError, match=r'annotation 2 \(00003.jpg, class 99\) is not in its class folder'):
            read_cars196(tmp_path)

    @pytest.mark.skipif(not (DATA_ROOT / 'cars196' / 'devkit').is_dir(),
                        reason=f'real CARS196 devkit files not found under {DATA_ROOT} (set CGD_HEADS_DATA)')
    def test_fixture_has_the_real_devkit_structure(self, tmp_path):
        write_cars_devkit(tmp_path, with_test=False)
        for name, var in (('cars_train_annos.mat', 'annotations'), ('cars_meta.mat', 'class_names')):
            real = scipy.io.loadmat(DATA_ROOT / 'cars196' / 'devkit' / name)[var]
            ours = scipy.io.loadmat(tmp_path / 'devkit' / name)[var]
            assert real.dtype.names == ours.dtype.names and real.ndim == ours.ndim == 2 and real.shape[0] == 1
            for field in real.dtype.names or [None]:
                r, o = (real[0, 0] if field is None else real[0, 0][field]), \
                       (ours[0, 0] if field is None else ours[0, 0][field])
                assert r.ndim == o.ndim and r.dtype.kind == o.dtype.kind, field


# ----------------------------------------------------------------------------------------------------------------
# Stanford Online Products and In-shop


def write_sop(root):
    root.mkdir(parents=True, exist_ok=True)
    header = 'image_id class_id super_class_id path\n'
    (root / 'Ebay_train.txt').write_text(header + '1 2 1 bicycle_final/2_0.JPG\n2 1 1 bicycle_final/1_0.JPG\n'
                                                  '3 2 1 bicycle_final/2_1.JPG\n')
    (root / 'Ebay_test.txt').write_text(header + '4 10 2 cabinet_final/10_0.JPG\n5 3 1 bicycle_final/3_0.JPG\n')


class TestSop:
    def test_splits(self, tmp_path):
        write_sop(tmp_path)
        splits = read_sop(tmp_path)
        assert splits['train'].class_names == ['1', '2'] and splits['train'].labels == [1, 0, 1]
        assert splits['train'].paths[0] == str(tmp_path / 'bicycle_final' / '2_0.JPG')
        # class ids order numerically: 3 before 10
        assert splits['test'].class_names == ['3', '10'] and splits['test'].labels == [1, 0]

    def test_bad_header_and_missing_file(self, tmp_path):
        write_sop(tmp_path)
        (tmp_path / 'Ebay_test.txt').write_text('4 10 2 cabinet_final/10_0.JPG\n')
        with pytest.raises(ValueError, match='header'):
            read_sop(tmp_path)
        (tmp_path / 'Ebay_test.txt').unlink()
        with pytest.raises(FileNotFoundError, match='Ebay_test.txt'):
            read_sop(tmp_path)


def write_inshop(root, count=None, in_eval=False):
    rows = [('img/WOMEN/Dresses/id_00000001/02_1_front.jpg', 'id_00000001', 'train'),
            ('img/WOMEN/Dresses/id_00000001/02_2_side.jpg', 'id_00000001', 'train'),
            ('img/MEN/Denim/id_00000002/01_1_front.jpg', 'id_00000002', 'train'),
            ('img/MEN/Denim/id_00000005/01_1_front.jpg', 'id_00000005', 'query'),
            ('img/MEN/Denim/id_00000003/01_1_front.jpg', 'id_00000003', 'query'),
            ('img/MEN/Denim/id_00000003/01_2_side.jpg', 'id_00000003', 'gallery'),
            ('img/MEN/Denim/id_00000004/01_2_side.jpg', 'id_00000004', 'gallery'),
            ('img/MEN/Denim/id_00000005/01_2_side.jpg', 'id_00000005', 'gallery')]
    folder = root / 'Eval' if in_eval else root
    folder.mkdir(parents=True, exist_ok=True)
    # the official file pads its columns with runs of spaces
    text = f'{len(rows) if count is None else count}\nimage_name item_id evaluation_status\n'
    text += ''.join(f'{p:<60}{i:<16}{s}\n' for p, i, s in rows)
    (folder / 'list_eval_partition.txt').write_text(text)


class TestInshop:
    @pytest.mark.parametrize('in_eval', [False, True])
    def test_splits_share_query_gallery_labels(self, tmp_path, in_eval):
        write_inshop(tmp_path, in_eval=in_eval)
        splits = read_inshop(tmp_path)
        assert list(splits) == ['train', 'query', 'gallery']
        assert splits['train'].class_names == ['id_00000001', 'id_00000002']
        assert splits['train'].labels == [0, 0, 1]
        shared = ['id_00000003', 'id_00000004', 'id_00000005']
        assert splits['query'].class_names == shared and splits['gallery'].class_names == shared
        assert splits['query'].labels == [2, 0] and splits['gallery'].labels == [0, 1, 2]
        assert splits['query'].paths[0] == str(tmp_path / 'img/MEN/Denim/id_00000005/01_1_front.jpg')

    def test_count_mismatch(self, tmp_path):
        write_inshop(tmp_path, count=9)
        with pytest.raises(ValueError, match='announces 9 images but 8'):
            read_inshop(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# ImageFolder and CSV


def write_folder(root):
    """Classes apple (2), Banana (1, nested), cherry (3), Date (1); plus files that are not images."""
    for rel in ('apple/1.jpg', 'apple/2.png', 'Banana/sub/deeper/1.JPEG', 'cherry/1.png', 'cherry/2.png',
                'cherry/3.bmp', 'Date/1.webp'):
        write_image(root / rel)
    (root / 'apple' / 'notes.txt').write_text('not an image')
    (root / 'apple' / '._1.jpg').write_bytes(b'macOS resource fork')
    (root / '.hidden_class').mkdir()
    write_image(root / '.hidden_class' / 'x.png')


class TestImageFolder:
    def test_all_in_one_split_case_insensitive_order(self, tmp_path):
        write_folder(tmp_path)
        splits = read_image_folder(tmp_path)
        assert list(splits) == ['all']
        lst = splits['all']
        assert lst.class_names == ['apple', 'Banana', 'cherry', 'Date']
        assert lst.labels == [0, 0, 1, 2, 2, 2, 3]
        assert lst.paths[2] == str(tmp_path / 'Banana' / 'sub' / 'deeper' / '1.JPEG')

    @pytest.mark.parametrize('train_classes, expected_train', [(1, ['apple']), (3, ['apple', 'Banana', 'cherry']),
                                                                (0.5, ['apple', 'Banana']), (0.75, ['apple', 'Banana',
                                                                                                    'cherry'])])
    def test_class_split(self, tmp_path, train_classes, expected_train):
        write_folder(tmp_path)
        splits = read_image_folder(tmp_path, train_classes=train_classes)
        assert splits['train'].class_names == expected_train
        assert splits['test'].class_names == [c for c in ['apple', 'Banana', 'cherry', 'Date']
                                              if c not in expected_train]
        counts = {'apple': 2, 'Banana': 1, 'cherry': 3, 'Date': 1}
        assert len(splits['train']) == sum(counts[c] for c in expected_train)
        assert splits['test'].labels[0] == 0

    def test_bad_arguments_and_layouts(self, tmp_path):
        write_folder(tmp_path / 'data')
        for bad in (0, 4, 0.1, 1.5):
            with pytest.raises(ValueError, match='train_classes'):
                read_image_folder(tmp_path / 'data', train_classes=bad)
        with pytest.raises(TypeError, match='train_classes'):
            read_image_folder(tmp_path / 'data', train_classes=True)
        with pytest.raises(ValueError, match='exclude'):
            read_image_folder(tmp_path / 'data', exclude=['Fig'])
        assert read_image_folder(tmp_path / 'data', exclude=['Date'])['all'].num_classes == 3
        (tmp_path / 'data' / 'Empty').mkdir()
        with pytest.raises(FileNotFoundError, match='Empty has no images'):
            read_image_folder(tmp_path / 'data')
        (tmp_path / 'bare').mkdir()
        with pytest.raises(ValueError, match='no class sub-folders'):
            read_image_folder(tmp_path / 'bare')
        with pytest.raises(FileNotFoundError, match='missing'):
            read_image_folder(tmp_path / 'missing')

    def test_list_images_reads_every_image_at_any_depth_without_classes(self, tmp_path, monkeypatch):
        write_folder(tmp_path / 'data')
        write_image(tmp_path / 'data' / 'loose.png')  # beside the folders: a catalogue's images
        expected = sorted(os.path.join(dirpath, f) for dirpath, dirs, files in os.walk(tmp_path / 'data')
                          for f in files if not f.startswith('.') and '.hidden_class' not in dirpath
                          and f.rsplit('.', 1)[-1].lower() in ('jpg', 'png', 'jpeg', 'bmp', 'webp'))
        assert len(expected) == 8 and list_images(tmp_path / 'data') == expected
        # a relative root gives absolute paths, like read_image_folder's (ImageList refuses relative ones)
        monkeypatch.chdir(tmp_path)
        assert list_images('data') == [os.path.join(os.getcwd(), os.path.relpath(p, tmp_path)) for p in expected]
        # linked folders are followed, each folder listed once, a link back up does not loop
        (tmp_path / 'linked').mkdir()
        os.symlink(tmp_path / 'data' / 'cherry', tmp_path / 'linked' / 'cars')
        os.symlink(tmp_path / 'data' / 'cherry', tmp_path / 'linked' / 'cars_again')
        os.symlink(tmp_path / 'linked', tmp_path / 'linked' / 'loop')
        got = list_images(tmp_path / 'linked')
        assert len(got) == 3 and {os.path.basename(p) for p in got} == {'1.png', '2.png', '3.bmp'}
        (tmp_path / 'none' / 'sub').mkdir(parents=True)
        (tmp_path / 'none' / 'sub' / 'notes.txt').write_text('not an image')
        with pytest.raises(FileNotFoundError, match='holds no images'):
            list_images(tmp_path / 'none')
        with pytest.raises(FileNotFoundError, match='missing'):
            list_images(tmp_path / 'missing')

    def test_exclude_as_one_string_and_linked_folders_inside_a_class(self, tmp_path):
        for name in ('1', '2', '12', '3'):
            write_image(tmp_path / 'data' / name / 'a.png')
        with pytest.raises(TypeError, match=r"exclude must be a list.*pass \['12'\]"):
            read_image_folder(tmp_path / 'data', exclude='12')  # was: classes '1' and '2' left out, '12' kept
        assert read_image_folder(tmp_path / 'data', exclude=['12'])['all'].class_names == ['1', '2', '3']
        write_image(tmp_path / 'extra' / 'b.png')
        write_image(tmp_path / 'extra' / 'c.png')
        os.symlink(tmp_path / 'extra', tmp_path / 'data' / '3' / 'more')
        # links back to another class or to the root: never a second label for those images, and no loop
        os.symlink(tmp_path / 'data' / '1', tmp_path / 'data' / '3' / 'again')
        os.symlink(tmp_path / 'data', tmp_path / 'data' / '3' / 'up')
        images = read_image_folder(tmp_path / 'data')['all']  # as list_images (and torchvision): links followed
        assert sorted(os.path.basename(p) for p, c in zip(images.paths, images.labels)
                      if images.class_names[c] == '3') == ['a.png', 'b.png', 'c.png']
        assert len(images) == len(set(images.paths)) == len(list_images(tmp_path / 'data')) == 6


def write_csv(path, rows, header=('path', 'label', 'split')):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_yes_no_options_refuse_strings(tmp_path):
    write_cub(tmp_path / 'cub')
    write_cars_devkit(tmp_path / 'cars')
    write_image(tmp_path / 'data' / 'a' / '1.png')
    images = read_image_folder(tmp_path / 'data')['all']
    for call, name in ((lambda v: create_cgd_transform(IMAGENET_CONFIG, is_training=v, img_size=8), 'is_training'),
                       (lambda v: ImageDataset(images, skip_bad_images=v), 'skip_bad_images'),
                       (lambda v: read_cars196(tmp_path / 'cars', crop=v), 'crop'),
                       (lambda v: read_cub200(tmp_path / 'cub', crop=v), 'crop')):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got str 'False'"):
            call('False')  # a truthy string: was the training transform, the decoding pass, the boxes
        call(False)


class TestCsv:
    def test_splits_relative_and_absolute_paths(self, tmp_path):
        absolute = str(tmp_path / 'elsewhere' / 'z.jpg')
        path = write_csv(tmp_path / 'lists' / 'data.csv', [
            ('imgs/a.jpg', 'dog', 'train'), ('imgs/b.jpg', 'cat', 'train'), (absolute, 'dog', 'train'),
            ('q1.jpg', 'zebra', 'query'), ('g1.jpg', 'emu', 'gallery'), ('g2.jpg', 'zebra', 'gallery'),
            ('t1.jpg', 'owl', 'test')])
        splits = read_csv(path)
        assert list(splits) == ['train', 'query', 'gallery', 'test']
        assert splits['train'].paths == [str(tmp_path / 'lists' / 'imgs' / 'a.jpg'),
                                         str(tmp_path / 'lists' / 'imgs' / 'b.jpg'), absolute]
        assert splits['train'].class_names == ['cat', 'dog'] and splits['train'].labels == [1, 0, 1]
        assert splits['query'].class_names == splits['gallery'].class_names == ['emu', 'zebra']
        assert splits['query'].labels == [1] and splits['gallery'].labels == [0, 1]
        assert splits['test'].class_names == ['owl'] and splits['test'].labels == [0]

    def test_without_split_column(self, tmp_path):
        path = write_csv(tmp_path / 'd.csv', [('a.png', 'x'), ('b.png', 'w')], header=('path', 'label'))
        splits = read_csv(path)
        assert list(splits) == ['all'] and splits['all'].class_names == ['w', 'x'] and splits['all'].labels == [1, 0]

    def test_errors(self, tmp_path):
        with pytest.raises(ValueError, match=r"missing \['label'\]"):
            read_csv(write_csv(tmp_path / 'a.csv', [('a.png',)], header=('path',)))
        with pytest.raises(ValueError, match=r"line 3: empty \['label'\]"):
            read_csv(write_csv(tmp_path / 'b.csv', [('a.png', 'x'), ('b.png', '')], header=('path', 'label')))
        with pytest.raises(ValueError, match='no data rows'):
            read_csv(write_csv(tmp_path / 'c.csv', [], header=('path', 'label')))
        with pytest.raises(FileNotFoundError, match='nope.csv'):
            read_csv(tmp_path / 'nope.csv')


# ----------------------------------------------------------------------------------------------------------------
# Omniglot


def write_omniglot_zip(path, stem, alphabets):
    """Zip laid out as <stem>/<Alphabet>/character<NN>/<id>_<drawer>.png, directory entries included."""
    png = io.BytesIO()
    Image.new('1', (8, 8), 1).save(png, format='PNG')
    with zipfile.ZipFile(path, 'w') as zf:
        zf.writestr(f'{stem}/', '')
        for alphabet, num_chars in alphabets.items():
            for c in range(1, num_chars + 1):
                zf.writestr(f'{stem}/{alphabet}/character{c:02d}/', '')
                for drawer in (1, 2):
                    zf.writestr(f'{stem}/{alphabet}/character{c:02d}/{c:02d}{drawer:02d}_{drawer:02d}.png',
                                png.getvalue())


@pytest.fixture
def omniglot_zips(tmp_path, monkeypatch):
    data = tmp_path / 'data'
    data.mkdir()
    write_omniglot_zip(data / 'images_background_small1.zip', 'images_background_small1',
                       {'Latin': 2, 'Bengali': 1})
    write_omniglot_zip(data / 'images_background_small2.zip', 'images_background_small2', {'Greek': 3})
    cache = tmp_path / 'cache'
    monkeypatch.setenv('CGD_HEADS_CACHE', str(cache))
    return data, cache


class TestOmniglot:
    def test_reads_zips_into_cache_only(self, omniglot_zips):
        data, cache = omniglot_zips
        before = listing(data)
        splits = read_omniglot(data)
        assert listing(data) == before
        train, test = splits['train'], splits['test']
        assert train.class_names == ['Bengali/character01', 'Latin/character01', 'Latin/character02']
        assert train.labels == [0, 0, 1, 1, 2, 2] and len(test) == 6 and test.num_classes == 3
        assert test.class_names == ['Greek/character01', 'Greek/character02', 'Greek/character03']
        for path in train.paths + test.paths:
            assert Path(path).is_relative_to(cache / 'omniglot')
        assert Path(train.paths[0]).parts[-3:] == ('Bengali', 'character01', '0101_01.png')
        extracted = sorted(p.name for p in (cache / 'omniglot').iterdir())
        size = (data / 'images_background_small1.zip').stat().st_size
        assert extracted[0].startswith(f'images_background_small1-{size}-') and len(extracted) == 2
        img, _ = ImageDataset(train)[0]
        assert img.mode == 'RGB' and img.size == (8, 8)
        # a second read reuses the extraction
        marker = Path(train.paths[0]).parents[2] / 'marker'
        marker.write_text('x')
        assert read_omniglot(data)['train'].paths == train.paths and marker.exists()

    def test_interrupted_extraction_leaves_nothing(self, omniglot_zips, monkeypatch):
        data, cache = omniglot_zips

        def fail(self, path, *args, **kwargs):
            Path(path, 'half').write_text('partial')
            raise KeyboardInterrupt

        monkeypatch.setattr(zipfile.ZipFile, 'extractall', fail)
        with pytest.raises(KeyboardInterrupt):
            read_omniglot(data)
        assert list((cache / 'omniglot').iterdir()) == []
        monkeypatch.undo()
        monkeypatch.setenv('CGD_HEADS_CACHE', str(cache))
        assert len(read_omniglot(data)['train']) == 6

    def test_concurrent_extraction_uses_the_winner(self, omniglot_zips, monkeypatch):
        data, cache = omniglot_zips
        real_rename = os.rename

        def lose_race(src, dst):
            # another process renames its finished copy into place first
            Path(dst).mkdir()
            (Path(dst) / 'winner').write_text('x')
            real_rename(src, dst)

        monkeypatch.setattr(zip_cache.os, 'rename', lose_race)
        target = zip_cache.extract_zip_cached(data / 'images_background_small1.zip', 'omniglot')
        assert (target / 'winner').exists()
        assert [p.name for p in (cache / 'omniglot').iterdir()] == [target.name]

    def test_extracted_folders_and_errors(self, omniglot_zips, tmp_path):
        data, cache = omniglot_zips
        extracted = tmp_path / 'extracted'
        for name in ('images_background_small1', 'images_background_small2'):
            with zipfile.ZipFile(data / f'{name}.zip') as zf:
                zf.extractall(extracted)
        splits = read_omniglot(extracted)
        assert splits['train'].paths[0] == str(extracted / 'images_background_small1/Bengali/character01/0101_01.png')
        assert not cache.exists()
        (data / 'images_background_small2.zip').write_bytes(b'not a zip')
        with pytest.raises(ValueError, match='images_background_small2.zip is not a valid zip'):
            read_omniglot(data)
        (data / 'images_background_small2.zip').unlink()
        with pytest.raises(FileNotFoundError, match='images_background_small2'):
            read_omniglot(data)


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher


class TestLoadSplits:
    def test_auto_detection(self, tmp_path, monkeypatch):
        monkeypatch.setenv('CGD_HEADS_CACHE', str(tmp_path / 'cache'))
        write_cub(tmp_path / 'cub')
        write_cars_devkit(tmp_path / 'cars')
        write_sop(tmp_path / 'sop')
        write_inshop(tmp_path / 'inshop', in_eval=True)
        write_folder(tmp_path / 'folder')
        write_image(tmp_path / 'caltech' / '101_ObjectCategories' / 'a' / '1.jpg')
        write_image(tmp_path / 'caltech' / '101_ObjectCategories' / 'b' / '1.jpg')
        write_csv(tmp_path / 'list.csv', [('a.png', 'x')], header=('path', 'label'))
        (tmp_path / 'omni').mkdir()
        write_omniglot_zip(tmp_path / 'omni' / 'images_background_small1.zip', 'images_background_small1', {'A': 1})
        write_omniglot_zip(tmp_path / 'omni' / 'images_background_small2.zip', 'images_background_small2', {'B': 1})
        expected = {'cub': 'cub200', 'cub/CUB_200_2011': 'cub200', 'cars': 'cars196', 'sop': 'sop',
                    'inshop': 'inshop', 'folder': 'folder', 'list.csv': 'csv', 'omni': 'omniglot',
                    'caltech': 'caltech101', 'caltech/101_ObjectCategories': 'caltech101'}
        for rel, name in expected.items():
            assert detect_dataset(tmp_path / rel) == name, rel
            # the fixture has 2 classes, fewer than the protocol's 50 training classes
            kwargs = {'train_classes': 1} if name == 'caltech101' else {}
            auto = load_splits('auto', tmp_path / rel, **kwargs)
            named = DATASET_READERS[name](tmp_path / rel, **kwargs)
            assert {k: (v.paths, v.labels) for k, v in auto.items()} == \
                   {k: (v.paths, v.labels) for k, v in named.items()}
        caltech = load_splits('caltech101', tmp_path / 'caltech', train_classes=1)
        assert caltech['train'].class_names == ['a'] and caltech['test'].class_names == ['b']
        with pytest.raises(ValueError, match=r'train_classes .* got 50'):
            load_splits('caltech101', tmp_path / 'caltech')
        assert load_splits('folder', tmp_path / 'folder', train_classes=2)['train'].class_names == ['apple', 'Banana']
        assert load_splits('cub200', tmp_path / 'cub', crop=True)['train'].boxes is not None

    def test_errors(self, tmp_path):
        with pytest.raises(ValueError, match="unknown data set 'imagenet'; valid names: auto, cub200, cars196"):
            load_splits('imagenet', tmp_path)
        with pytest.raises(FileNotFoundError, match='missing'):
            load_splits('auto', tmp_path / 'missing')
        with pytest.raises(ValueError, match='cannot detect'):
            load_splits('auto', tmp_path)
        with pytest.raises(TypeError, match='crop'):
            load_splits('sop', tmp_path, crop=True)
        with pytest.raises(FileNotFoundError, match='missing'):
            load_splits('folder', tmp_path / 'missing')


# ----------------------------------------------------------------------------------------------------------------
# ImageDataset and bad images


@pytest.fixture
def mixed_images(tmp_path):
    good_rgb = write_image(tmp_path / 'good.png', size=(20, 10), color=(10, 20, 30))
    good_gray = write_image(tmp_path / 'gray.jpg', size=(12, 8), color=77, mode='L')
    truncated = write_image(tmp_path / 'truncated.jpg', size=(64, 64), color=(1, 2, 3))
    data = truncated.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    text = tmp_path / 'text.png'
    text.write_text('this is not an image')
    missing = tmp_path / 'missing.jpg'
    paths = [good_rgb, truncated, good_gray, text, missing]
    return ImageList([str(p) for p in paths], [0, 1, 1, 0, 1], ['a', 'b'])


class TestImageDataset:
    def test_rgb_conversion_and_labels(self, mixed_images):
        ds = ImageDataset(mixed_images)
        img, label = ds[0]
        assert img.mode == 'RGB' and img.size == (20, 10) and label == 0
        assert img.getpixel((3, 3)) == (10, 20, 30)
        gray, label = ds[2]
        assert gray.mode == 'RGB' and label == 1
        r, g, b = (np.asarray(gray)[..., i] for i in range(3))
        assert np.array_equal(r, g) and np.array_equal(g, b) and abs(int(r.mean()) - 77) <= 1
        assert ds.labels == [0, 1, 1, 0, 1] and len(ds) == 5 and ds.skipped == []

    @pytest.mark.parametrize('index, error, name', [(1, BadImageError, 'truncated.jpg'),
                                                    (3, BadImageError, 'text.png'),
                                                    (4, FileNotFoundError, 'missing.jpg')])
    def test_bad_image_errors_name_the_file(self, mixed_images, index, error, name):
        with pytest.raises(error, match=name) as info:
            ImageDataset(mixed_images)[index]
        assert isinstance(info.value, OSError)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is False

    def test_skip_bad_images(self, mixed_images, caplog):
        with caplog.at_level(logging.WARNING, logger='cgd_heads.data'):
            ds = ImageDataset(mixed_images, skip_bad_images=True)
        assert [Path(p).name for p in ds.skipped] == ['truncated.jpg', 'text.png', 'missing.jpg']
        assert len(ds) == 2 and ds.labels == [0, 1] and ds.class_names == ['a', 'b']
        assert [Path(p).name for p in ds.paths] == ['good.png', 'gray.jpg']
        assert ds[1][0].mode == 'RGB'
        for name in ('truncated.jpg', 'text.png', 'missing.jpg'):
            assert name in caplog.text
        with pytest.raises(ValueError, match='none of the 1 images'):
            ImageDataset(ImageList([mixed_images.paths[4]], [0], ['a']), skip_bad_images=True)

    def test_transform_sampler_and_argument_checks(self, mixed_images):
        from pytorch_metric_learning.samplers import MPerClassSampler

        ds = ImageDataset(mixed_images, transform=create_cgd_transform(IMAGENET_CONFIG, False, img_size=16),
                          skip_bad_images=True)
        x, _ = ds[0]
        assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16)
        sampler = MPerClassSampler(ds.labels, m=2, length_before_new_iter=4)
        assert sorted(ds.labels[i] for i in sampler) == [0, 0, 1, 1]
        with pytest.raises(IndexError):
            ds[2]
        with pytest.raises(TypeError, match='ImageList'):
            ImageDataset(mixed_images.paths)
        with pytest.raises(TypeError, match='transform'):
            ImageDataset(mixed_images, transform='resize')

    def test_box_outside_image(self, tmp_path):
        path = write_image(tmp_path / 'a.png', size=(10, 10))
        with pytest.raises(ValueError, match='does not overlap'):
            ImageDataset(ImageList([str(path)], [0], ['a'], boxes=[(20, 20, 30, 30)]))[0]
        img, _ = ImageDataset(ImageList([str(path)], [0], ['a'], boxes=[(5, 5, 12, 30)]))[0]
        assert img.size == (5, 5)  # clipped to the image


# ----------------------------------------------------------------------------------------------------------------
# Transforms


class TestTransforms:
    def test_eval_squashes_and_normalises(self):
        t = create_cgd_transform(IMAGENET_CONFIG, is_training=False, img_size=64)
        img = Image.new('RGB', (300, 100), (51, 102, 204))
        x = t(img)
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        expected = [(v / 255 - m) / s for v, m, s in zip((51, 102, 204), IMAGENET_CONFIG['mean'],
                                                          IMAGENET_CONFIG['std'])]
        torch.testing.assert_close(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4, rtol=0)
        assert t.transforms[0].size == (64, 64) and t.transforms[0].interpolation == InterpolationMode.BICUBIC

    def test_train_resize_crop_flip(self):
        t = create_cgd_transform({'mean': (0.5,) * 3, 'std': (0.5,) * 3}, is_training=True)
        assert t.transforms[0].size == (252, 252) and t.transforms[0].interpolation == InterpolationMode.BILINEAR
        assert create_cgd_transform(IMAGENET_CONFIG, True, img_size=100).transforms[0].size == (112, 112)
        assert create_cgd_transform(IMAGENET_CONFIG, True, img_size=100, resize_size=100).transforms[0].size == \
            (100, 100)
        # left half black, right half white: a flip shows up as a bright left column
        img = Image.new('RGB', (500, 80), (0, 0, 0))
        img.paste((255, 255, 255), (250, 0, 500, 80))
        torch.manual_seed(0)
        left_bright = set()
        for _ in range(20):
            x = t(img)
            assert x.shape == (3, 224, 224)
            assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6
            left_bright.add(bool(x[:, :, 0].mean() > 0))
        assert left_bright == {True, False}

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="'mean'"):
            create_cgd_transform({'std': (1, 1, 1)}, True)
        with pytest.raises(ValueError, match='resize_size must be >= img_size'):
            create_cgd_transform(IMAGENET_CONFIG, True, img_size=224, resize_size=200)
        with pytest.raises(ValueError, match='img_size'):
            create_cgd_transform(IMAGENET_CONFIG, False, img_size=0)
        with pytest.raises(ValueError, match='interpolation'):
            create_cgd_transform(dict(IMAGENET_CONFIG, interpolation='cubic-ish'), False)
        with pytest.raises(TypeError, match='data_config'):
            create_cgd_transform([0.5, 0.5], False)

    def test_timm_data_config(self):
        import timm

        model = timm.create_model('resnet18', pretrained=False, num_classes=0)
        config = timm.data.resolve_model_data_config(model)
        x = create_cgd_transform(config, is_training=False, img_size=32)(Image.new('RGB', (50, 40)))
        torch.testing.assert_close(x[:, 0, 0], -torch.tensor(config['mean']) / torch.tensor(config['std']))


# ----------------------------------------------------------------------------------------------------------------
# Real data (skipped where absent)


def _needs(name):
    return pytest.mark.skipif(not (DATA_ROOT / name).is_dir(),
                              reason=f'real data {DATA_ROOT / name} not found (set CGD_HEADS_DATA to the folder '
                                     f'holding {name}/)')


@_needs('cars196')
def test_real_cars196():
    root = DATA_ROOT / 'cars196'
    # auto picks the devkit reader with the class folders (there is no cars_train/ here)
    splits = load_splits('auto', root)
    train, test = splits['train'], splits['test']
    assert (len(train), train.num_classes) == (4052, 98) and (len(test), test.num_classes) == (4092, 98)
    assert train.class_names[0] == 'AM General Hummer SUV 2000' and train.boxes is None
    # the devkit's labels agree with the folders: the same split as the folder reader on images/
    folders = load_splits('folder', root / 'images', train_classes=98)
    for name in ('train', 'test'):
        assert sorted(zip(splits[name].paths, splits[name].labels)) == \
            sorted(zip(folders[name].paths, folders[name].labels))
    img, label = ImageDataset(test)[0]
    assert img.mode == 'RGB' and min(img.size) <= 192 and label == test.labels[0]


@_needs('omniglot')
def test_real_omniglot(tmp_path, monkeypatch):
    monkeypatch.setenv('CGD_HEADS_CACHE', str(tmp_path))
    before = listing(DATA_ROOT / 'omniglot')
    splits = load_splits('auto', DATA_ROOT / 'omniglot')
    assert listing(DATA_ROOT / 'omniglot') == before
    assert (len(splits['train']), splits['train'].num_classes) == (2720, 136)
    assert (len(splits['test']), splits['test'].num_classes) == (3120, 156)
    assert all(Path(p).is_relative_to(tmp_path) for p in splits['train'].paths)
    assert ImageDataset(splits['test'])[0][0].size == (105, 105)


@_needs('caltech101')
def test_real_caltech101():
    splits = load_splits('caltech101', DATA_ROOT / 'caltech101')
    train, test = splits['train'], splits['test']
    assert (train.num_classes, test.num_classes, len(test)) == (50, 51, 3981)
    assert train.num_classes + test.num_classes == 101
    # same people in both folders: they must be on the same side of the split
    assert {'Faces', 'Faces_easy'} <= set(train.class_names)
    assert load_splits('auto', DATA_ROOT / 'caltech101' / '101_ObjectCategories')['test'].paths == test.paths


def test_sixteen_bit_and_transparent_images_are_decoded_as_the_grid_shows_them(tmp_path):
    from cgd_heads.data.image_io import load_rgb_image
    from cgd_heads.retrieval.visualize import _to_pil
    # a 16-bit ramp 0..60000: convert('RGB') clipped every value above 255 to white; min-max rescaling keeps the ramp
    ramp = np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / 'ramp.png')
    row = np.asarray(load_rgb_image(str(tmp_path / 'ramp.png')))[0, :, 0].astype(int)
    expected = np.floor(ramp[0] / 60000 * 255 + 0.5).astype(int)
    assert np.abs(row - expected).max() <= 1
    # a fully transparent red image is white (composited on white), not the red (or black) under the alpha
    Image.new('RGBA', (8, 8), (255, 0, 0, 0)).save(tmp_path / 'clear.png')
    Image.new('LA', (8, 8), (0, 128)).save(tmp_path / 'half.png')  # black at half opacity on white: 127 or 128
    assert load_rgb_image(str(tmp_path / 'clear.png')).getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127.5) <= 1 for v in load_rgb_image(str(tmp_path / 'half.png')).getpixel((0, 0)))
    for name in ('ramp.png', 'clear.png', 'half.png'):  # the model's pixels are the grid's
        assert np.array_equal(np.asarray(load_rgb_image(str(tmp_path / name))),
                              np.asarray(_to_pil(str(tmp_path / name), 'image')))
